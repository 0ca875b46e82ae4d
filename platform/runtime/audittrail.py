"""The tenant's audit trail: append-only, hash-chained, verifiable.

Every entry stores the hash of the entry before it (``prev_hash``) and its own
``hash``: SHA-256 over a canonical JSON of its fields and ``prev_hash``. An
edited entry no longer matches its hash; a deleted, reordered or inserted entry
breaks the links, and :func:`verify` says which entry and how. ``seq`` (the
storage order) is deliberately outside the hash: the order that counts is the
chain of links, and keeping ``seq`` out lets a reordering show up as "entry N
follows entry M" instead of as an unexplained changed entry.

Appends are serialised per tenant by updating the one-row ``_audit_head`` first
(PostgreSQL holds the row lock until commit; SQLite's write lock already
serialises writers), so two concurrent transactions can never both link to the
same predecessor. Entries are written inside the caller's transaction: a change
that rolls back leaves no audit entry, and an audit entry that cannot be
written rolls the change back. There is no update or delete API.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.visitors import InternalTraversal
from uuid6 import uuid7

from metacrm.runtime.pipeline import Pipeline
from metacrm.runtime.store import audit, audit_head

#: ``prev_hash`` of the first entry.
GENESIS = "0" * 64
#: Actions are dotted lower-case words: ``record.update``, ``auth.login_failed``.
ACTION = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
MAX_ACTION = 40
MAX_NAME = 254
MAX_IP = 45
#: The fields the hash covers, in the order they are listed in exports.
HASHED = (
    "id",
    "at",
    "actor_id",
    "actor_name",
    "action",
    "entity",
    "record_id",
    "changes",
    "detail",
    "ip",
)
_HEAD_ID = 1


def _no_client() -> str | None:
    return None


#: Where the address of the client being served comes from, kept with every entry
#: that does not name one, so record writes and publishes made through the API say
#: where they came from. The web application installs its own (the current
#: request's address, ``set_client_source``); asked only when an entry is written,
#: so a request that writes nothing pays nothing for it.
_client_source: Callable[[], str | None] = _no_client


def set_client_source(source: Callable[[], str | None]) -> None:
    """Make ``source`` say whose address an entry written now keeps (None: no client)."""
    global _client_source
    _client_source = source


def client_ip() -> str | None:
    """The address of the client being served now, if any."""
    return _client_source()


#: The key of ``detail`` that marks a grouped entry (how many records it covers): one
#: ``record.create`` entry for the records of one import batch, with ``record_id``
#: empty (decision record 0013). Its ``changes`` is written in columns (decision record
#: 0015): ``{"ids": [record id, ...], "values": {field: [value per record, ...]}}``;
#: entries written before that hold ``{record id: {field: value}}``.
GROUPED = "records"
#: The keys of a grouped entry's ``changes`` in columns: no record id is either.
GROUP_IDS = "ids"
GROUP_VALUES = "values"


def group_changes(ids: list[str], columns: Mapping[str, list[Any]]) -> dict[str, Any]:
    """Return the ``changes`` of a grouped entry: ``ids``, and each field's values in id order.

    Field names are written once, not once per record, and a column of one field's
    values is cheap to check, hash and store (decision record 0015).
    """
    return {GROUP_IDS: ids, GROUP_VALUES: dict(columns)}


def group_members(changes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Return a grouped entry's ``changes`` as ``{record id: {field: value}}``, in either form."""
    ids = changes.get(GROUP_IDS)
    columns = changes.get(GROUP_VALUES)
    if not (isinstance(ids, list) and isinstance(columns, dict)):
        return {str(key): value for key, value in changes.items()}  # before decision 0015
    members: dict[str, dict[str, Any]] = {str(key): {} for key in ids}
    for name, column in columns.items():
        if isinstance(column, list):
            for key, value in zip(ids, column, strict=False):
                members[str(key)][name] = value
    return members


def is_grouped(entry: Mapping[str, Any]) -> bool:
    """Tell whether an entry stands for many records (``changes`` keyed by record id)."""
    detail = entry["detail"]
    return (
        entry["record_id"] is None
        and entry["entity"] is not None
        and isinstance(detail, dict)
        and GROUPED in detail
    )


class _GroupHolds(sa.sql.expression.ColumnElement[bool]):
    """SQL: a grouped entry's ``changes`` has a key (a record id); see :func:`about_record`.

    The key is a bound parameter and part of the cache key (as for ``_JSONText``).
    """

    _traverse_internals = [("key", InternalTraversal.dp_clauseelement)]
    type = sa.Boolean()
    inherit_cache = True

    def __init__(self, key: str) -> None:
        self.key = sa.bindparam("group_key", key, type_=sa.String(), unique=True)


@compiles(_GroupHolds, "postgresql")
def _group_holds_postgresql(element: _GroupHolds, compiler: Any, **kw: Any) -> str:
    changes = compiler.process(audit.c.changes, **kw)
    key = compiler.process(element.key, **kw)
    # `?` on an array matches its string elements; the second test reads older entries.
    return f"(({changes} -> '{GROUP_IDS}') ? {key} OR {changes} ? {key})"


@compiles(_GroupHolds)
def _group_holds_sqlite(element: _GroupHolds, compiler: Any, **kw: Any) -> str:
    changes = compiler.process(audit.c.changes, **kw)
    key = compiler.process(element.key, **kw)
    return (
        f"(EXISTS (SELECT 1 FROM json_each({changes}, '$.{GROUP_IDS}') "
        f"WHERE json_each.value = {key}) "
        f"OR json_type({changes}, '$.\"' || {key} || '\"') IS NOT NULL)"
    )


def about_record(record_id: uuid.UUID) -> sa.ColumnElement[bool]:
    """Return the condition "the entry is about this record", grouped entries included.

    A record created by an import has no entry of its own: the entry of its batch
    lists it among the keys of ``changes``.
    """
    return sa.or_(
        audit.c.record_id == record_id,
        sa.and_(
            audit.c.record_id.is_(None),
            audit.c.action == "record.create",
            audit.c.entity.is_not(None),
            _GroupHolds(str(record_id)),
        ),
    )


class AuditError(ValueError):
    """An audit entry was refused because a field is malformed."""


def _canonical(value: Any) -> Any:
    """Return a JSON value in the one form both backends give back.

    PostgreSQL's JSONB keeps numbers as ``numeric`` (``1e300`` comes back as a
    301-digit integer, ``1.0`` as ``1.0``); writing every number as its
    normalised decimal text makes the hash independent of that round trip.
    """
    kind = type(value)
    if value is None or kind is str or kind is bool:
        return value
    if kind is dict:
        # The usual shape ({field: [old, new]} of text): no call per plain value.
        found = {}
        for key, item in value.items():
            key = key if type(key) is str else str(key)
            if key[:1] == "$":
                key = "$" + key
            found[key] = item if item is None or type(item) is str else _canonical(item)
        return found
    if kind is list:
        # Columns of a grouped entry: a check in C instead of a call per value.
        kinds = set(map(type, value))
        if kinds <= _AS_IS:
            return value
        if kinds == {int}:
            return [{"$n": _integer_text(v)} for v in value]
        return [_canonical(v) for v in value]
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        if isinstance(value, float) and (value != value or value in (float("inf"), -float("inf"))):
            raise AuditError("audit values cannot hold NaN or infinity")
        number = decimal.Decimal(repr(value) if isinstance(value, float) else value)
        return {"$n": format(number.normalize(), "E") if number else "0"}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, Mapping):
        # Keys starting with '$' get one more, so no object can pose as a number.
        return {
            ("$" + str(k) if str(k).startswith("$") else str(k)): _canonical(v)
            for k, v in value.items()
        }
    raise AuditError(f"audit values must be JSON, not {type(value).__name__}")


#: Types ``_canonical`` keeps as they are.
_AS_IS = frozenset({str, bool, type(None)})
#: JSON values that read back from their JSON text as they were written.
_SCALARS = frozenset({str, bool, int, type(None)})


@functools.lru_cache(maxsize=8192, typed=True)
def _integer_text(value: int) -> str:
    """Return ``_canonical``'s text of an integer (its normalised decimal, ``4.2E+3``).

    Kept for the whole numbers seen last: a column of an import repeats them (counts,
    quantities), and the decimal arithmetic cost more than the rest of the value.
    """
    return format(decimal.Decimal(value).normalize(), "E") if value else "0"


def _timestamp(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


#: How the hashed text is written (:func:`_hashed_text`).
_CANONICAL_JSON: dict[str, Any] = {
    "sort_keys": True,
    "separators": (",", ":"),
    "ensure_ascii": False,
}
#: The key of a prepared entry holding its ``changes`` as canonical JSON text, when
#: :func:`_grouped_texts` made it (dropped with the other texts once written).
_CANONICAL_CHANGES = "changes_canonical"


def _grouped_texts(changes: Mapping[str, Any]) -> tuple[str, str] | None:
    """Return a grouped entry's ``changes`` as stored JSON and as canonical JSON text.

    For ``{"ids": [...], "values": {field: [...]}}`` (:func:`group_changes`) whose
    ids are text and whose columns hold only text, booleans and nulls, or only whole
    numbers. Each column is serialised once (checked in C) and serves both texts,
    except whole numbers, whose canonical form is ``{"$n": "<normalised>"}``; the
    canonical text is byte for byte what ``json.dumps`` of :func:`_canonical` with
    sorted keys gives (decision record 0018). None for anything else, which takes
    the general path.
    """
    ids, columns = changes.get(GROUP_IDS), changes.get(GROUP_VALUES)
    if (
        len(changes) != 2
        or type(ids) is not list
        or type(columns) is not dict
        or not set(map(type, ids)) <= {str}
    ):
        return None
    compact = _COMPACT_JSON
    stored, canonical = [], []
    for name in sorted(columns):
        column = columns[name]
        if type(name) is not str or name[:1] == "$" or type(column) is not list:
            return None
        kinds = set(map(type, column))
        key = compact(name) + ":"
        if kinds <= _AS_IS:
            text = compact(column)
            stored.append(key + text)
            canonical.append(key + text)
        elif kinds == {int}:
            stored.append(key + compact(column))
            numbers = '"},{"$n":"'.join(map(_integer_text, column))
            canonical.append(key + '[{"$n":"' + numbers + '"}]')
        else:
            return None
    start = '{"' + GROUP_IDS + '":' + compact(ids) + ',"' + GROUP_VALUES + '":{'
    return start + ",".join(stored) + "}}", start + ",".join(canonical) + "}}"


#: JSON without spaces or ASCII escapes, as the canonical text writes values.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _hashed_text(entry: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """Return the canonical JSON of an entry before and after its ``prev_hash``, as UTF-8.

    The hash covers ``before + prev_hash + after``: the previous hash is the only
    part that PostgreSQL fills in when it appends an entry in one statement
    (:func:`append`), and the only one an import's entries wait for
    (:class:`_PendingHash`). Keys are sorted, and ``prev_hash`` sorts after every
    hashed field but ``record_id``.
    """
    # The document's keys, sorted: action, actor_id, actor_name, at, changes, detail,
    # entity, id, ip. ``changes`` is written on its own so that a grouped entry can
    # bring the text it made a column at a time (_grouped_texts); the whole is what
    # one json.dumps of the document with sorted keys gives.
    changes = entry.get(_CANONICAL_CHANGES)
    if changes is None:
        changes = json.dumps(_canonical(entry["changes"]), **_CANONICAL_JSON)
    head = {
        "action": entry["action"],
        "actor_id": None if entry["actor_id"] is None else str(entry["actor_id"]),
        "actor_name": entry["actor_name"],
        "at": _timestamp(entry["at"]),
    }
    tail = {
        "detail": _canonical(entry["detail"]),
        "entity": entry["entity"],
        "id": str(entry["id"]),
        "ip": entry["ip"],
    }
    text = (
        json.dumps(head, **_CANONICAL_JSON)[:-1]
        + ',"changes":'
        + changes
        + ","
        + json.dumps(tail, **_CANONICAL_JSON)[1:]
    )
    record_id = None if entry["record_id"] is None else str(entry["record_id"])
    before = text[:-1] + ',"prev_hash":"'
    after = '","record_id":' + json.dumps(record_id) + "}"
    return before.encode("utf-8"), after.encode("utf-8")


def _link(prev_hash: str) -> bytes:
    """The previous hash as it stands inside the JSON string (a tampered one may hold anything)."""
    return json.dumps(prev_hash, ensure_ascii=False)[1:-1].encode("utf-8")


def entry_hash(entry: Mapping[str, Any], prev_hash: str) -> str:
    """Return the SHA-256 (hex) of an entry's hashed fields and the previous hash."""
    before, after = _hashed_text(entry)
    return hashlib.sha256(before + _link(prev_hash) + after).hexdigest()


class _PendingHash:
    """An entry's hash worked out up to its ``prev_hash``, which only the chain's lock gives.

    Everything before the link, ``changes`` included, is hashed before the lock
    is taken: an import does that while the server is still busy with the
    batch's rows.
    """

    def __init__(self, entry: Mapping[str, Any]) -> None:
        before, self.tail = _hashed_text(entry)
        self.state = hashlib.sha256(before)

    def hexdigest(self, prev_hash: str) -> str:
        """Return the entry's hash once its predecessor's is known (= ``entry_hash``)."""
        state = self.state.copy()
        state.update(_link(prev_hash) + self.tail)
        return state.hexdigest()


def _json(value: Any, name: str) -> tuple[Any, str]:
    """Check that a value is plain JSON (what the column stores and the hash covers).

    The C encoder refuses what JSON cannot hold (NaN, infinity, other types), so
    no walk of our own is needed; decoding again gives the value as stored.
    Returns the value as stored and its JSON text, which is what the row is
    written with (serialising a batch's entry again cost as much as this).
    """
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError:
        raise AuditError("audit values cannot hold NaN or infinity") from None
    except TypeError as exc:
        raise AuditError(f"'{name}' must be JSON: {exc}") from None
    _refuse_nul(text, name)
    return (value if _as_stored(value) else json.loads(text)), text


def _refuse_nul(text: str, name: str) -> None:
    """Refuse JSON text holding a NUL character, which PostgreSQL's JSONB cannot store."""
    if "\\u0000" in text:
        raise AuditError(f"'{name}' cannot contain NUL characters")


def _as_stored(value: Any) -> bool:
    """Tell whether a JSON-serialisable value reads back from its JSON text as it is.

    Objects with text keys, lists, text, whole numbers, true/false and null do
    (a grouped entry's columns are checked a list at a time, in C); a tuple, a
    key that is not text or a subclass does not, and is decoded again instead.
    """
    kind = type(value)
    if kind is dict:
        return all(type(key) is str and _as_stored(item) for key, item in value.items())
    if kind is list:
        kinds = set(map(type, value))
        if kinds <= _SCALARS:
            return True
        return kinds <= _SCALARS | {list, dict} and all(map(_as_stored, value))
    return kind in _SCALARS


class _JSONText(sa.sql.expression.ColumnElement[Any]):
    """SQL: a bound parameter holding JSON text, as the JSON column's value.

    Its parameter is part of its cache key, so statements using it are compiled
    once and cached like any other (without, SQLAlchemy could not make a key
    and compiled the INSERT on every append: about 0.1 ms of a write on SQLite).
    """

    _traverse_internals = [
        ("text", InternalTraversal.dp_clauseelement),
        ("type", InternalTraversal.dp_type),
    ]
    inherit_cache = True

    def __init__(self, name: str) -> None:
        self.type = audit.c.changes.type
        self.text = sa.bindparam(name, type_=sa.Text())


@compiles(_JSONText, "postgresql")
def _json_text_postgresql(element: _JSONText, compiler: Any, **kw: Any) -> str:
    return f"CAST({compiler.process(element.text, **kw)} AS JSONB)"


@compiles(_JSONText)
def _json_text_sqlite(element: _JSONText, compiler: Any, **kw: Any) -> str:
    return compiler.process(element.text, **kw)  # SQLite keeps JSON as its text


#: Keys of a prepared entry that its INSERT does not bind (the values go as JSON text).
_NOT_BOUND = frozenset({"changes", "detail", _CANONICAL_CHANGES})
#: Entries go in with their JSON values as text (see :func:`_json`).
_INSERT = audit.insert().values(changes=_JSONText("changes_json"), detail=_JSONText("detail_json"))


def _advance_head(connection: Connection, count: int) -> tuple[int, str]:
    """Reserve ``count`` seq numbers; return the first one and the hash it links to.

    The head is locked before anything is read, so a concurrent append waits
    here until this transaction ends and then sees its result: on PostgreSQL by
    ``SELECT … FOR UPDATE`` (the caller writes seq and hash in one UPDATE after,
    so a long import leaves one row version per append, not two), on SQLite by
    an ``UPDATE … RETURNING`` that takes the write lock at once (a read first
    could fail to upgrade its lock). The head row is created on first use if a
    namespace made before it lacks it.
    """
    if connection.dialect.name == "postgresql":
        advance: sa.Executable = (
            sa.select((audit_head.c.seq + count).label("seq"), audit_head.c.hash)
            .where(audit_head.c.id == _HEAD_ID)
            .with_for_update()
        )
    else:
        advance = (
            audit_head.update()
            .where(audit_head.c.id == _HEAD_ID)
            .values(seq=audit_head.c.seq + count)
            .returning(audit_head.c.seq, audit_head.c.hash)
        )
    row = connection.execute(advance).first()
    if row is None:
        last = connection.execute(
            sa.select(audit.c.seq, audit.c.hash).order_by(audit.c.seq.desc()).limit(1)
        ).first()
        values = {
            "id": _HEAD_ID,
            "seq": last.seq if last else 0,
            "hash": last.hash if last else GENESIS,
        }
        insert = (postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert)(
            audit_head
        )
        connection.execute(insert.values(**values).on_conflict_do_nothing())
        row = connection.execute(advance).one()
    return row.seq - count + 1, row.hash


def _prepare(
    *,
    action: str,
    actor_id: uuid.UUID | None,
    actor_name: str | None,
    entity: str | None = None,
    record_id: uuid.UUID | None = None,
    changes: Mapping[str, Any] | None = None,
    detail: Mapping[str, Any] | None = None,
    ip: str | None = None,
    at: dt.datetime | None = None,
) -> dict[str, Any]:
    """Check an entry's fields and return it as it will be stored (without its place)."""
    if not isinstance(action, str) or len(action) > MAX_ACTION or not ACTION.match(action):
        raise AuditError(f"'{action}' is not an audit action (dotted lower-case words)")
    if actor_name is not None and (not isinstance(actor_name, str) or len(actor_name) > MAX_NAME):
        raise AuditError(f"the actor name must be text of at most {MAX_NAME} characters")
    if ip is None:
        ip = client_ip()
    if ip is not None and (not isinstance(ip, str) or len(ip) > MAX_IP):
        raise AuditError(f"the IP address must be text of at most {MAX_IP} characters")
    if entity is not None and (not isinstance(entity, str) or len(entity) > 63):
        raise AuditError("the entity must be an API name")
    for name, value in (("actor_id", actor_id), ("record_id", record_id)):
        if value is not None and not isinstance(value, uuid.UUID):
            raise AuditError(f"'{name}' must be a UUID")
    when = at or dt.datetime.now(dt.UTC)
    if not isinstance(when, dt.datetime) or when.tzinfo is None:
        raise AuditError("the time of an audit entry must carry a time zone")
    grouped = None if changes is None else _grouped_texts(changes)
    canonical_changes = None
    if grouped is not None:
        changes_json, canonical_changes = grouped
        stored_changes = dict(changes)
        _refuse_nul(changes_json, "changes")
    else:
        stored_changes, changes_json = (
            (None, None) if changes is None else _json(dict(changes), "changes")
        )
    stored_detail, detail_json = (None, None) if detail is None else _json(dict(detail), "detail")
    return {
        "id": uuid7(),
        # Stored at microsecond precision on both backends; hash what is stored.
        "at": when.astimezone(dt.UTC),
        "actor_id": actor_id,
        "actor_name": actor_name,
        "action": action,
        "entity": entity,
        "record_id": record_id,
        "changes": stored_changes,
        "detail": stored_detail,
        "ip": ip,
        "changes_json": changes_json,
        "detail_json": detail_json,
        _CANONICAL_CHANGES: canonical_changes,
    }


def append(
    connection: Connection,
    *,
    action: str,
    actor_id: uuid.UUID | None,
    actor_name: str | None,
    entity: str | None = None,
    record_id: uuid.UUID | None = None,
    changes: Mapping[str, Any] | None = None,
    detail: Mapping[str, Any] | None = None,
    ip: str | None = None,
    at: dt.datetime | None = None,
    pipeline: Pipeline | None = None,
) -> dict[str, Any]:
    """Append one entry to the tenant's audit trail, in the caller's transaction.

    ``connection`` is a tenant connection inside a transaction
    (``TenantStore.begin()``). ``action`` is dotted lower-case words
    (``record.update``, ``auth.login_failed``); ``changes`` maps field names to
    ``[old, new]`` (mask secrets before passing them); ``detail`` holds any
    other JSON worth keeping (a version, a comment, a token name); ``at``
    defaults to now. Call it as late in the transaction as possible: from
    here until commit, other appends in the tenant wait. Returns the stored
    entry, ``seq``, ``prev_hash`` and ``hash`` included; with a ``pipeline``
    (of ``connection``) those three are filled in when the pipeline ends.

    On PostgreSQL the append is one statement: it locks the head, moves it and
    inserts the entry, the hash computed by the server over the canonical text
    this process made (:func:`_hashed_text`) and the head's hash.
    """
    entry = _prepare(
        action=action,
        actor_id=actor_id,
        actor_name=actor_name,
        entity=entity,
        record_id=record_id,
        changes=changes,
        detail=detail,
        ip=ip,
        at=at,
    )
    if connection.dialect.name != "postgresql":
        return append_prepared(connection, Prepared([entry], [_PendingHash(entry)]))[0]
    before, after = _hashed_text(entry)
    values = {f"entry_{name}": entry[name] for name in _ONE_ENTRY_COLUMNS}
    values.update(hash_before=before, hash_after=after)
    if pipeline is None:
        found = connection.execute(_append_one(), values).first()
        _appended(connection, entry, found)
        return entry
    pending = pipeline.execute(_append_one(), values, reused=True)
    pipeline.then(lambda: _appended(connection, entry, pending.first()))
    return entry


def _appended(connection: Connection, entry: dict[str, Any], found: Any) -> None:
    """Complete an entry appended in one statement; without a head row, append it again."""
    if found is None:
        # A namespace made before the head row: the statement inserted nothing.
        append_prepared(connection, Prepared([entry], [_PendingHash(entry)]))
        return
    entry["seq"], entry["prev_hash"], entry["hash"] = found[0], found[1], found[2]
    _forget_texts(entry)


#: The columns :func:`_append_one` binds (the rest come from the locked head).
_ONE_ENTRY_COLUMNS = tuple(c.name for c in audit.c if c.name not in ("seq", "prev_hash", "hash"))


@functools.cache
def _append_one() -> sa.Insert:
    """``INSERT INTO _audit`` of one entry that locks and moves the head in the same statement.

    ``head`` locks the head row (``FOR UPDATE``: a writer that waited gets the row
    its predecessor committed); ``moved`` stores the next seq and the new hash,
    ``sha256(before || head.hash || after)``, computed from the locked values and
    returns them with the old hash; the INSERT writes the entry from them. Built
    once: every value is a bound parameter, so it is compiled once per process.
    """
    head = (
        sa.select(audit_head.c.id, audit_head.c.seq, audit_head.c.hash)
        .where(audit_head.c.id == _HEAD_ID)
        .with_for_update()
        .cte("head")
    )
    text = sa.LargeBinary()
    linked = (
        sa.bindparam("hash_before", type_=text)
        .op("||", return_type=text)(sa.func.convert_to(head.c.hash, "UTF8"))
        .op("||", return_type=text)(sa.bindparam("hash_after", type_=text))
    )
    moved = (
        audit_head.update()
        .where(audit_head.c.id == head.c.id)
        .values(seq=head.c.seq + 1, hash=sa.func.encode(sa.func.sha256(linked), "hex"))
        .returning(audit_head.c.seq, audit_head.c.hash, head.c.hash.label("prev_hash"))
        .cte("moved")
    )
    names = list(_ONE_ENTRY_COLUMNS)
    rows = sa.select(
        moved.c.seq,
        # Not named as the columns: an INSERT's parameters named so would set them.
        *(sa.bindparam(f"entry_{name}", type_=audit.c[name].type) for name in names),
        moved.c.prev_hash,
        moved.c.hash,
    )
    return (
        audit.insert()
        .from_select(["seq", *names, "prev_hash", "hash"], rows)
        .returning(audit.c.seq, audit.c.prev_hash, audit.c.hash)
    )


def append_many(
    connection: Connection, entries: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Append several entries in order, taking the lock once (bulk writes, imports).

    Each mapping holds the keyword arguments of :func:`append`. All entries
    are checked before anything is written.
    """
    return append_prepared(connection, prepare(entries))


@dataclass
class Prepared:
    """Entries checked, serialised and hashed up to their link (:func:`prepare`)."""

    entries: list[dict[str, Any]]
    hashes: list[_PendingHash]


def prepare(entries: Iterable[Mapping[str, Any]]) -> Prepared:
    """Check entries and do the work of appending them that needs no database.

    Each mapping holds the keyword arguments of :func:`append`. What is left for
    :func:`append_prepared` is taking the chain's lock, linking and writing.
    """
    prepared = [_prepare(**entry) for entry in entries]
    return Prepared(prepared, [_PendingHash(entry) for entry in prepared])


def append_prepared(connection: Connection, prepared: Prepared) -> list[dict[str, Any]]:
    """Append entries made by :func:`prepare` in order, taking the lock once.

    The head is locked, the entries linked in Python and written (``seq``,
    ``prev_hash`` and ``hash`` filled in): two statements however many entries.
    """
    if not prepared.entries:
        return []
    seq, prev_hash = _advance_head(connection, len(prepared.entries))
    for entry, pending in zip(prepared.entries, prepared.hashes, strict=True):
        entry["seq"] = seq
        entry["prev_hash"] = prev_hash
        entry["hash"] = prev_hash = pending.hexdigest(prev_hash)
        seq += 1
    entries = prepared.entries
    set_head = audit_head.update().where(audit_head.c.id == _HEAD_ID).values(hash=prev_hash)
    if connection.dialect.name == "postgresql":
        set_head = set_head.values(seq=seq - 1)
    # Two statements, both compiled once and cached: a data-modifying CTE carrying
    # the entries as a VALUES list would save a round trip but is compiled anew on
    # every call, which costs more than the trip.
    rows = [{k: v for k, v in entry.items() if k not in _NOT_BOUND} for entry in entries]
    connection.execute(_INSERT, rows)
    connection.execute(set_head)
    for entry in entries:
        _forget_texts(entry)
    return entries


def _forget_texts(entry: dict[str, Any]) -> None:
    """Drop the JSON texts :func:`_prepare` made for writing: the stored entry has none."""
    del entry["changes_json"], entry["detail_json"], entry[_CANONICAL_CHANGES]


# --- verification -------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One sign of tampering, located by ``seq`` (and the entry's id when there is one)."""

    kind: str  # changed, missing, inserted, reordered, head
    seq: int | None
    entry_id: str | None
    message: str


@dataclass
class Report:
    """The outcome of :func:`verify`."""

    entries: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _rows(connection: Connection, batch: int = 5000) -> Iterator[Any]:
    """Yield every entry in ``seq`` order, a batch at a time (keyset, bounded memory)."""
    after: int | None = None
    while True:
        query = sa.select(audit).order_by(audit.c.seq).limit(batch)
        if after is not None:
            query = query.where(audit.c.seq > after)
        rows = connection.execute(query).mappings().all()
        yield from rows
        if len(rows) < batch:
            return
        after = rows[-1]["seq"]


def verify(connection: Connection, anchors: Mapping[int, str] | None = None) -> Report:
    """Check the whole chain and the head; describe every break found.

    A first pass streams the log and only notes where links break. Only if
    something broke does a second pass index every entry's hash to tell a
    deletion from a reordering or an insertion. ``anchors`` maps a ``seq`` to
    the hash its entry had when someone wrote it down earlier (the head that
    a previous ``verify`` printed): a chain rebuilt from some entry on is
    consistent in itself, but cannot keep those hashes.
    """
    anchors = dict(anchors or {})
    report = Report()
    suspects: list[int] = []
    previous_hash, previous_seq = GENESIS, 0
    for row in _rows(connection):
        report.entries += 1
        seq, entry_id = row["seq"], str(row["id"])
        expected = anchors.pop(seq, None)
        if expected is not None and expected != row["hash"]:
            report.problems.append(
                Problem(
                    "changed",
                    seq,
                    entry_id,
                    f"entry seq {seq} (id {entry_id}) has hash {row['hash']}, not the "
                    f"{expected} written down for it: the chain was rebuilt from this entry "
                    "or an earlier one",
                )
            )
        try:
            recomputed = entry_hash(row, row["prev_hash"])
        except (AuditError, KeyError, TypeError, AttributeError):
            recomputed = ""
        if recomputed != row["hash"] and row["prev_hash"] != previous_hash:
            try:
                relinked = entry_hash(row, previous_hash) == row["hash"]
            except (AuditError, KeyError, TypeError, AttributeError):
                relinked = False
            if relinked:
                # Only the link was edited: the content still hashes onto its predecessor.
                report.problems.append(
                    Problem(
                        "changed",
                        seq,
                        entry_id,
                        f"entry seq {seq} (id {entry_id}) was changed: its prev_hash was "
                        "edited (the rest of the entry is intact)",
                    )
                )
                previous_hash, previous_seq = row["hash"], seq
                continue
        if recomputed != row["hash"]:
            report.problems.append(
                Problem(
                    "changed",
                    seq,
                    entry_id,
                    f"entry seq {seq} (id {entry_id}) was changed: its content does not "
                    "match its hash",
                )
            )
        if row["prev_hash"] != previous_hash:
            suspects.append(seq)
        elif seq != previous_seq + 1:
            report.problems.append(
                Problem(
                    "changed",
                    seq,
                    entry_id,
                    f"entry seq {seq} (id {entry_id}) follows seq {previous_seq} in the chain: "
                    "seq numbers were edited (the links are intact)",
                )
            )
        previous_hash, previous_seq = row["hash"], seq
    report.head_seq, report.head_hash = previous_seq, previous_hash
    for seq, expected in sorted(anchors.items()):
        report.problems.append(
            Problem(
                "missing",
                seq,
                None,
                f"entry seq {seq} (written down with hash {expected}) is no longer in the log",
            )
        )
    if suspects:
        report.problems.extend(_diagnose(connection, suspects))
    head = connection.execute(
        sa.select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == _HEAD_ID)
    ).first()
    if head is None:
        if report.entries:
            report.problems.append(
                Problem("head", None, None, "the chain head (_audit_head) is missing")
            )
    elif (head.seq, head.hash) != (previous_seq, previous_hash):
        if head.seq > previous_seq:
            kind = "missing"
            message = (
                f"entries after seq {previous_seq} are missing (deleted): the head records "
                f"seq {head.seq} with hash {head.hash}"
            )
        elif head.seq < previous_seq:
            kind = "inserted"
            message = (
                f"entries after seq {head.seq} were added outside the audit trail (inserted): "
                f"the head records seq {head.seq}, the last entry is seq {previous_seq}"
            )
        else:
            kind = "head"
            message = (
                f"the head records hash {head.hash} for seq {head.seq}, but the last entry "
                f"has hash {previous_hash}: the last entry was replaced"
            )
        report.problems.append(Problem(kind, head.seq, None, message))
    report.problems.sort(key=lambda p: (p.seq is None, p.seq or 0))
    return report


def _diagnose(connection: Connection, suspects: list[int]) -> list[Problem]:
    """Explain each broken link from an index of every entry's hash and predecessor."""
    order: list[int] = []
    hash_of: dict[int, str] = {}
    prev_of: dict[int, str] = {}
    id_of: dict[int, str] = {}
    for row in _rows(connection):
        order.append(row["seq"])
        hash_of[row["seq"]] = row["hash"]
        prev_of[row["seq"]] = row["prev_hash"]
        id_of[row["seq"]] = str(row["id"])
    by_hash = {h: seq for seq, h in hash_of.items()}
    linked = set(prev_of.values())
    position = {seq: i for i, seq in enumerate(order)}

    def before(seq: int, steps: int = 1) -> int | None:
        i = position[seq] - steps
        return order[i] if i >= 0 else None

    # An inserted entry: nothing links to it, and the entry after it links to the
    # one before it (the chain simply skips it).
    inserted: set[int] = set()
    for seq in suspects:
        skipped = before(seq)
        if skipped is None or hash_of[skipped] in linked:
            continue
        two_back = before(seq, 2)
        if prev_of[seq] == (GENESIS if two_back is None else hash_of[two_back]):
            inserted.add(skipped)
    problems = [
        Problem(
            "inserted",
            seq,
            id_of[seq],
            f"entry seq {seq} (id {id_of[seq]}) was inserted: no entry links to it and the "
            f"chain goes from seq {before(seq)} straight to seq {order[position[seq] + 1]}",
        )
        for seq in sorted(inserted)
    ]
    for seq in suspects:
        previous = before(seq)
        if seq in inserted or previous in inserted:
            continue
        where = f"entry seq {seq} (id {id_of[seq]})"
        target = by_hash.get(prev_of[seq])
        if prev_of[seq] == GENESIS:
            problems.append(
                Problem(
                    "reordered",
                    seq,
                    id_of[seq],
                    f"{where} is the first entry of the chain but is stored after seq "
                    f"{previous}: entries were reordered",
                )
            )
        elif target is not None:
            problems.append(
                Problem(
                    "reordered",
                    seq,
                    id_of[seq],
                    f"{where} follows seq {target} in the chain, not seq {previous}: entries "
                    "were reordered",
                )
            )
        elif previous is None:
            problems.append(
                Problem(
                    "missing",
                    seq,
                    id_of[seq],
                    f"{where} is stored first but links to an entry that is no longer there: "
                    "the first entries were deleted",
                )
            )
        elif seq != previous + 1:
            problems.append(
                Problem(
                    "missing",
                    seq,
                    id_of[seq],
                    f"seq {previous + 1} to {seq - 1} are missing (deleted): {where} links to "
                    "an entry that is no longer there",
                )
            )
        else:
            problems.append(
                Problem(
                    "missing",
                    seq,
                    id_of[seq],
                    f"{where} links to an entry that is no longer there: an entry before it "
                    f"was deleted (and the seq numbers closed up), or seq {previous} was "
                    "changed and re-hashed",
                )
            )
    return problems
