"""The record service: create, read, update, delete, restore and purge records.

Every write is one transaction (the caller's) holding the change, its audit
entry and its outbox event: if any of the three fails, none is stored.
Validation comes first and reports every problem of a payload at once; the
database constraints stay the last line, and their errors are translated into
the same field messages instead of leaking as exceptions.
"""

from __future__ import annotations

import datetime as dt
import decimal
import difflib
import functools
import itertools
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from uuid6 import uuid7

from metacrm.metadata import fieldtypes
from metacrm.metadata.coltypes import SQLITE_DIGITS
from metacrm.metadata.expression import EvalContext, compile_sql
from metacrm.metadata.fieldtypes import ValueProblem, constraint_name
from metacrm.metadata.model import FieldDef
from metacrm.runtime import audittrail, direct
from metacrm.runtime.authz import Access, Forbidden, OwnerRefused
from metacrm.runtime.contextfree import ContextFreeCache
from metacrm.runtime.crypto import FieldCipher
from metacrm.runtime.model import EntityModel, TenantModel, parsed
from metacrm.runtime.pipeline import Pipeline, pipelined
from metacrm.runtime.recordschema import load_column, load_payload, payload_plan
from metacrm.runtime.recordview import (
    SYSTEM_FIELDS,
    attach_relations,
    cached_select_columns,
    column_resolver,
    json_value,
    json_values,
    rows_to_json,
    select_columns,
)
from metacrm.runtime.store import outbox, sequence

MASK = "********"
_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")


#: Execution option of a connection whose whole transaction ends with the write: the
#: caller rolls everything back on any error, so a savepoint would only cost round trips.
WHOLE_TRANSACTION = "metacrm_whole_transaction"


def whole_transaction(connection: Connection) -> Connection:
    """Return the connection marked as one whose transaction is rolled back on any error."""
    return connection.execution_options(**{WHOLE_TRANSACTION: True})


def _in_savepoint(func: _F) -> _F:
    """Run a writer in a SAVEPOINT of the caller's transaction.

    A refused write (a rule that fails after the row was written, a race on a
    unique value) must leave nothing behind even when the caller catches the
    error and goes on using its transaction. A caller that never goes on (an API
    request: any error rolls its transaction back) marks its connection with
    :func:`whole_transaction` and saves the SAVEPOINT and RELEASE round trips.
    """

    @functools.wraps(func)
    def wrapper(connection: Connection, *args: Any, **kwargs: Any) -> Any:
        if connection.get_execution_options().get(WHOLE_TRANSACTION):
            return func(connection, *args, **kwargs)
        with connection.begin_nested():
            return func(connection, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class Caller:
    """Who writes: recorded as owner, creator, updater and in the audit trail."""

    user_id: uuid.UUID | None
    name: str
    team_id: uuid.UUID | None = None
    #: What the caller may do; None for the platform itself (rules, imports by operators,
    #: the demo), which is not limited. With it, hidden fields are refused like unknown
    #: ones and never returned, read-only fields are refused, and ``owner_id`` may be
    #: assigned within the caller's scope.
    access: Access | None = None


class RecordError(Exception):
    """A record operation was refused; the subclasses say why."""


class RecordNotFound(RecordError):
    """No live record with this id (or it is outside the caller's reach)."""


class RecordInvalid(RecordError):
    """The payload breaks the entity's rules; ``errors`` lists each problem."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['pointer']}: {e['message']}" for e in errors))
        self.errors = errors


class VersionMismatch(RecordError):
    """The record changed since the caller read it."""

    def __init__(self, current: int) -> None:
        super().__init__(f"the record is at version {current}")
        self.current = current


@dataclass
class _Context:
    connection: Connection
    model: TenantModel
    entity: EntityModel
    caller: Caller
    cipher: FieldCipher
    now: dt.datetime
    #: Owners assigned by the payload (``owner_id``), per item pointer: (owner, their team).
    owners: dict[str, tuple[uuid.UUID, uuid.UUID | None]] = field(default_factory=dict)

    @property
    def table(self) -> sa.Table:
        return self.entity.table

    def eval_context(self) -> EvalContext:
        today = self.now.astimezone(self.model.timezone).date()
        if self.caller.access is not None:
            teams: Sequence[uuid.UUID] = self.caller.access.teams
        else:
            teams = (self.caller.team_id,) if self.caller.team_id else ()
        return EvalContext(now=self.now, today=today, user_id=self.caller.user_id, team_ids=teams)


def _context(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    caller: Caller,
    cipher: FieldCipher,
) -> _Context:
    return _Context(connection, model, entity, caller, cipher, dt.datetime.now(dt.UTC))


# -- reading ------------------------------------------------------------------------------


def _fetch(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    record_id: uuid.UUID,
    ctx: EvalContext,
    *,
    deleted: bool = False,
    scope: sa.ColumnElement[bool] | None = None,
) -> dict[str, Any]:
    dialect = connection.dialect
    (query, names), shared = _read_statement(model, entity, ctx, deleted, dialect)
    prepared = None
    if scope is None and shared:
        schema = direct.schema_of(connection)
        prepared = _PREPARED_READS.get(
            query,
            direct.dialect_key(dialect, schema),
            lambda: direct.prepare(query, dialect, schema, ("read_record_id",)),
        )
    if prepared is not None:
        found = direct.rows(connection, prepared, {"read_record_id": record_id})
        row = found[0] if found else None
    else:
        if scope is not None:
            query = query.where(scope)
        row = connection.execute(query, {"read_record_id": record_id}).first()
    if row is None:
        raise RecordNotFound(f"no {entity.name} record with id {record_id}")
    record = rows_to_json(entity, names, [row], dialect)[0]
    attach_relations(connection, entity, [record])
    return record


#: Reads by id built without the request's context, per entity model.
_READS = ContextFreeCache()
#: Those reads compiled for the driver, per tenant schema (see ``direct``).
_PREPARED_READS = direct.PreparedCache()


def _read_statement(
    model: TenantModel, entity: EntityModel, ctx: EvalContext, deleted: bool, dialect: Dialect
) -> tuple[tuple[sa.Select[Any], tuple[str, ...]], bool]:
    """Return (the SELECT of one record by id, its column names) and whether it is shared.

    The id is bound as ``read_record_id``; a shared statement is the same object
    for every request of the published version (see ``ContextFreeCache.lookup``).

    Built once per published version (unless a formula reads ``today()`` or
    ``me()``): a read by id is the most frequent request, and building its
    select list and WHERE clause was a large part of its Python time.
    """

    def build(watched: EvalContext) -> tuple[sa.Select[Any], tuple[str, ...]]:
        table = entity.table
        live = table.c.deleted_at.is_not(None) if deleted else table.c.deleted_at.is_(None)
        columns = cached_select_columns(model, entity, watched, None, dialect)
        query = sa.select(*columns).where(
            table.c.id == sa.bindparam("read_record_id", type_=table.c.id.type), live
        )
        return query, tuple(c.name for c in query.selected_columns)

    return _READS.lookup(entity, (deleted, dialect.name, dialect.driver), build, ctx)


def get(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    record_id: uuid.UUID,
    ctx: EvalContext,
    *,
    deleted: bool = False,
    scope: sa.ColumnElement[bool] | None = None,
) -> dict[str, Any]:
    """Return one live record (or one in the recycle bin with ``deleted``)."""
    return _fetch(connection, model, entity, record_id, ctx, deleted=deleted, scope=scope)


# -- validation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _CreatePlan:
    """What a create adds to a payload's own values, worked out once per entity."""

    #: (name, field) of the fields a create fills when the payload leaves them out: a
    #: default, or "is required".
    unwritten: tuple[tuple[str, FieldDef], ...]
    unwritten_names: frozenset[str]
    #: Fields that must not be empty.
    required: frozenset[str]
    #: Fields whose values may have more digits than SQLite stores exactly: all but the
    #: decimal-like fields of a precision SQLite holds (their valid values have at most
    #: that many digits).
    wide_decimals: frozenset[str]


@functools.lru_cache(maxsize=1024)
def _create_plan(entity: EntityModel) -> _CreatePlan:
    active = list(entity.entity.active_fields())
    unwritten = tuple(
        (f.name, f) for f in active if f.type not in ("formula", "auto_number", "many_to_many")
    )
    return _CreatePlan(
        unwritten,
        frozenset(name for name, _ in unwritten),
        frozenset(f.name for f in active if f.required),
        frozenset(
            f.name
            for f in active
            if fieldtypes.get(f.type).coerce is not fieldtypes.get("decimal").coerce
            or fieldtypes.decimal_shape(f)[0] > SQLITE_DIGITS
        ),
    )


def _validate(
    c: _Context, data: Any, *, creating: bool, pointer: str = ""
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    if type(data) is not dict and not isinstance(data, Mapping):
        return {}, [{"pointer": pointer or "/", "message": "must be a JSON object of fields"}]
    screened: list[dict[str, str]] = []
    if c.caller.access is not None:
        data, screened = _screen(c, c.caller.access, data, pointer, creating)
    values, problems = load_payload(c.entity, data)
    errors = screened + [
        {"pointer": f"{pointer}/{name}", "message": message} for name, message in problems.items()
    ]
    plan = _create_plan(c.entity)
    if creating and not plan.unwritten_names <= data.keys():
        for name, f in plan.unwritten:
            if name in data:
                continue
            if f.has_default:
                values[name] = fieldtypes.get(f.type).coerce(f, f.default)
            elif f.required:
                errors.append({"pointer": f"{pointer}/{name}", "message": "is required"})
    wide = plan.wide_decimals if c.connection.dialect.name == "sqlite" else frozenset()
    required = plan.required
    if wide.isdisjoint(values) and not any(
        values[name] is None or values[name] == "" or values[name] == []
        for name in required & values.keys()
    ):
        return values, errors  # nothing below can object
    for name, value in values.items():
        if name in wide and _too_wide(value):
            errors.append(
                {
                    "pointer": f"{pointer}/{name}",
                    "message": f"has more than "
                    f"{SQLITE_DIGITS} significant digits, the most this installation's "
                    "database (SQLite) stores exactly",
                }
            )
        if name in required and (value is None or value == "" or value == []):
            errors.append({"pointer": f"{pointer}/{name}", "message": "is required"})
    return values, errors


def _too_wide(value: Any) -> bool:
    """Tell whether a value is a decimal with more digits than SQLite stores exactly."""
    return (
        isinstance(value, decimal.Decimal)
        and len(value.normalize().as_tuple().digits) > SQLITE_DIGITS
    )


#: A field a payload of a batch leaves out (None is a value: null).
_ABSENT = object()


@dataclass
class _Columns:
    """A bulk create's payloads read a field at a time (see :func:`_read_columns`)."""

    #: The fields the payloads give, in field order, and their values per payload
    #: (:data:`_ABSENT` where a payload leaves the field out).
    names: list[str]
    columns: list[list[Any]]
    #: Fields filled with their default where a payload leaves them out, and that value.
    defaults: list[tuple[str, Any]]
    count: int
    gaps: bool

    def rows(self) -> list[dict[str, Any]]:
        """Return each payload's values as :func:`_validate` does (keys in its order)."""
        names, defaults = self.names, self.defaults
        if not self.gaps and not defaults:
            return [dict(zip(names, row, strict=True)) for row in zip(*self.columns, strict=True)]
        batch = []
        for row in zip(*self.columns, strict=True):
            values = {name: v for name, v in zip(names, row, strict=True) if v is not _ABSENT}
            for name, default in defaults:
                if name not in values:
                    values[name] = default
            batch.append(values)
        return batch

    def filled(self) -> tuple[list[str], list[list[Any]]]:
        """Return every field's column with defaults filled in and null for the rest.

        A payload that leaves out a field without a default stores null there, as
        leaving it out means.
        """
        names, columns = list(self.names), []
        fill = dict(self.defaults)
        for name, column in zip(self.names, self.columns, strict=True):
            if self.gaps and _ABSENT in column:
                value = fill.pop(name, None)
                column = [value if v is _ABSENT else v for v in column]
            columns.append(column)
        for name, value in fill.items():
            if name not in self.names:
                names.append(name)
                columns.append([value] * self.count)
        return names, columns


def _read_columns(c: _Context, items: Sequence[Any]) -> _Columns | None:
    """Read a bulk create's payloads a field at a time; None when the per-row path must.

    Holds for each item exactly what :func:`_validate` would return (values, no
    errors) — or is None as soon as anything is not plainly fine: a value refused,
    a null, a required field left out or empty, a field that field-level security
    screens, an ``owner_id``. The caller then validates the items one by one,
    which words every problem; this path never words one. An import's batch is
    500 payloads with the same fields: a check over a column (in C) replaces a
    call per value.
    """
    if len(items) < 2 or any(type(data) is not dict for data in items):
        return None
    plan = payload_plan(c.entity)
    create = _create_plan(c.entity)
    given: set[str] = set().union(*items)
    if not plan.writable.issuperset(given):
        return None
    if c.caller.access is not None:
        rules = c.caller.access.field_rules(c.entity.name, c.model)
        if not (rules.hidden.isdisjoint(given) and rules.read_only.isdisjoint(given)):
            return None
    names: list[str] = []
    columns: list[list[Any]] = []
    converted: set[str] = set()
    gaps = False
    for name, _ in plan.converters:
        if name not in given:
            continue
        try:
            column = list(map(itemgetter(name), items))  # in C; a gap raises KeyError
        except KeyError:
            column = [data.get(name, _ABSENT) for data in items]
        if None in column:
            return None
        present = [v for v in column if v is not _ABSENT] if _ABSENT in column else column
        if len(present) < len(column):
            if name in create.required:
                return None
            gaps = True
        loaded = load_column(c.entity, name, present)
        if loaded is None:
            return None
        if loaded is not present:
            converted.add(name)  # values the column check did not pass as text or numbers
        if name in create.required and ("" in loaded or [] in loaded):
            return None
        if len(present) < len(column):
            filled = iter(loaded)
            loaded = [_ABSENT if v is _ABSENT else next(filled) for v in column]
        names.append(name)
        columns.append(loaded)
    defaults = []
    for name, f in create.unwritten:
        if name in given and not gaps:
            continue
        if f.has_default:
            defaults.append((name, fieldtypes.get(f.type).coerce(f, f.default)))
        elif f.required and name not in given:
            return None
    if c.connection.dialect.name == "sqlite":
        # SQLite's digits check (see _validate) words its refusal per row.
        for name, column in zip(names, columns, strict=True):
            if name in converted and name in create.wide_decimals and any(map(_too_wide, column)):
                return None
        for name, default in defaults:
            if name in create.wide_decimals and _too_wide(default):
                return None
    return _Columns(names, columns, defaults, len(items), gaps)


def _validate_batch(c: _Context, items: Sequence[Any]) -> list[dict[str, Any]] | None:
    """Return :func:`_read_columns`'s reading as each payload's values, or None."""
    batch = _read_columns(c, items)
    return None if batch is None else batch.rows()


def _screen(
    c: _Context, access: Access, data: Mapping[str, Any], pointer: str, creating: bool
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Apply field-level security to a payload before its values are read.

    A hidden field is refused with the very words an unknown field gets (and
    is never suggested for a typo), so a payload cannot probe for it; a field
    read-only for the caller's roles is refused as such; ``owner_id`` is taken
    out and checked against the caller's scope for the action.
    """
    rules = access.field_rules(c.entity.name, c.model)
    visible = [f.name for f in c.entity.entity.active_fields() if f.name not in rules.hidden]
    kept: dict[str, Any] = {}
    errors: list[dict[str, str]] = []
    for name, value in data.items():
        at = f"{pointer}/{_pointer_token(name)}"
        if name == "owner_id":
            try:
                c.owners[pointer] = _assign_owner(c, access, value, creating)
            except OwnerRefused as exc:
                errors.append({"pointer": at, "message": str(exc)})
            continue
        if name not in SYSTEM_FIELDS and (name in rules.hidden or c.entity.field(name) is None):
            close = difflib.get_close_matches(str(name), visible, 1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            errors.append({"pointer": at, "message": f"{_UNKNOWN_FIELD}'{c.entity.name}'{hint}"})
        elif name in rules.read_only:
            errors.append({"pointer": at, "message": "is read-only for your role"})
        else:
            kept[name] = value
    return kept, errors


#: How a payload's unknown field is refused (recordschema words it the same way).
_UNKNOWN_FIELD = "is not a field of "


def _pointer_token(name: object) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")


def _assign_owner(
    c: _Context, access: Access, value: Any, creating: bool
) -> tuple[uuid.UUID, uuid.UUID | None]:
    """Return (owner, team) for an ``owner_id`` in a payload, or raise OwnerRefused."""
    if not isinstance(value, str) or len(value) > 36:
        raise OwnerRefused("must be a user id (a UUID string)")
    try:
        owner = uuid.UUID(value)
    except ValueError:
        raise OwnerRefused("must be a user id (a UUID string)") from None
    action = "create" if creating else "update"
    try:
        return owner, access.assign_owner(c.entity.name, action, owner)
    except Forbidden as exc:
        raise OwnerRefused(str(exc)) from None


def _refused(c: _Context, errors: list[dict[str, str]]) -> RecordInvalid:
    """Return the refusal of a write, with nothing that names a field hidden from the caller.

    Errors of checks the caller cannot influence (a hidden required field, a rule
    on a hidden field) point at the record and say only that a field the caller
    cannot see refuses the change.
    """
    access = c.caller.access
    if access is None:
        return RecordInvalid(errors)
    hidden = access.field_rules(c.entity.name, c.model).hidden
    if not hidden:
        return RecordInvalid(errors)
    shown = []
    for error in errors:
        parts = error["pointer"].split("/")
        named = [p for p in parts[1:] if not p.isdigit()]
        text = error["message"]
        if text.startswith(_UNKNOWN_FIELD):
            shown.append(error)  # already worded as for a field that does not exist
            continue
        if (named and named[0] in hidden) or any(
            name in text.replace("'", " ").replace(".", " ").split() for name in hidden
        ):
            root = "/" + parts[1] if len(parts) > 1 and parts[1].isdigit() else "/"
            error = {
                "pointer": root,
                "message": "a field you cannot see does not allow this change; "
                "ask an administrator",
            }
        shown.append(error)
    return RecordInvalid(shown)


def _shown(c: _Context) -> tuple[TenantModel, EntityModel]:
    """Return the model and entity records are returned through (hidden fields removed)."""
    if c.caller.access is None:
        return c.model, c.entity
    model = c.caller.access.view(c.model)
    return model, model.entities[c.entity.name]


@functools.lru_cache(maxsize=1024)
def _reference_fields(entity: EntityModel) -> dict[str, FieldDef]:
    """Return the fields whose values point at records (lookups, relations, related-to)."""
    kinds = ("lookup", "many_to_many", "related_to")
    return {f.name: f for f in entity.entity.active_fields() if f.type in kinds}


@functools.lru_cache(maxsize=1024)
def _unique_fields(entity: EntityModel) -> frozenset[str]:
    return frozenset(f.name for f in entity.entity.active_fields() if f.unique)


def _check_references(c: _Context, rows: Sequence[tuple[str, dict[str, Any]]]) -> list[dict]:
    """Check that lookups, relations and related-to values point at live records."""
    references = _reference_fields(c.entity)
    if not references:
        return []
    wanted: dict[str, set[uuid.UUID]] = {}
    for _, values in rows:
        for name, value in values.items():
            if value is None or name not in references:
                continue
            f = references[name]
            if f.type == "lookup":
                wanted.setdefault(f.get("target"), set()).add(value)
            elif f.type == "many_to_many":
                wanted.setdefault(f.get("target"), set()).update(value)
            elif f.type == "related_to":
                wanted.setdefault(value[0], set()).add(value[1])
    found: dict[str, set[uuid.UUID]] = {}
    for target, ids in wanted.items():
        table = c.model.entities[target].table if target in c.model.entities else None
        if table is None:
            found[target] = set()
            continue
        query = sa.select(table.c.id).where(table.c.id.in_(ids), table.c.deleted_at.is_(None))
        found[target] = set(c.connection.execute(query).scalars())
    errors = []
    for pointer, values in rows:
        for name, value in values.items():
            if value is None or name not in references:
                continue
            f = references[name]
            if f.type == "lookup" and value not in found[f.get("target")]:
                errors.append(
                    {
                        "pointer": f"{pointer}/{name}",
                        "message": f"no live {f.get('target')} record with id {value}",
                    }
                )
            elif f.type == "many_to_many":
                missing = [str(v) for v in value if v not in found[f.get("target")]]
                if missing:
                    errors.append(
                        {
                            "pointer": f"{pointer}/{name}",
                            "message": f"no live {f.get('target')} record with id {missing[0]}",
                        }
                    )
            elif f.type == "related_to" and value[1] not in found[value[0]]:
                errors.append(
                    {
                        "pointer": f"{pointer}/{name}",
                        "message": f"no live {value[0]} record with id {value[1]}",
                    }
                )
    return errors


#: Values per ``IN (...)`` of the unique check: bounded statements for any bulk size.
_UNIQUE_CHUNK = 500


def _check_unique(
    c: _Context, rows: Sequence[tuple[str, dict[str, Any], uuid.UUID | None]]
) -> list[dict]:
    """Report unique values already taken, or repeated within one request.

    One ``IN (...)`` query per unique field and chunk of values, whatever the
    number of rows: a 500-row batch of an import must not cost 500 round trips.
    """
    unique = _unique_fields(c.entity)
    if not unique:
        return []
    errors = []
    seen: dict[tuple[str, Any], str] = {}
    wanted: dict[str, list[tuple[str, Any, uuid.UUID | None]]] = {}
    for pointer, values, own_id in rows:
        for name, value in values.items():
            if value is None or name not in unique:
                continue
            key = (name, value)
            if key in seen:
                errors.append(
                    {
                        "pointer": f"{pointer}/{name}",
                        "message": f"repeats the value of {seen[key]}/{name}",
                    }
                )
                continue
            seen[key] = pointer or "/"
            wanted.setdefault(name, []).append((pointer, value, own_id))
    for name, items in wanted.items():
        column = c.table.c[name]
        holders: dict[Any, list[uuid.UUID]] = {}
        for start in range(0, len(items), _UNIQUE_CHUNK):
            chunk = [value for _, value, _ in items[start : start + _UNIQUE_CHUNK]]
            query = sa.select(c.table.c.id, column).where(column.in_(chunk))
            for record_id, value in c.connection.execute(query):
                holders.setdefault(value, []).append(record_id)
        for pointer, value, own_id in items:
            taken = next((r for r in holders.get(value, ()) if r != own_id), None)
            if taken is not None:
                errors.append(
                    {
                        "pointer": f"{pointer}/{name}",
                        "message": f"must be unique; record {taken} already has it",
                    }
                )
    return errors


def _check_rules(c: _Context, ids: Iterable[tuple[str, uuid.UUID]]) -> list[dict]:
    """Check validation rules and pipeline stage requirements in SQL, after the write.

    SQL sees formulas and one lookup hop exactly as lists and filters do. A rule
    fails when its expression is false; null passes, as with a CHECK constraint.
    ``ids`` (pointer, record id) is read only when there is something to check, so a
    bulk create may pass a generator.
    """
    checks = []
    ctx = c.eval_context()
    resolver = column_resolver(c.model, c.entity, ctx)
    for rule in c.entity.entity.doc.get("validation_rules", []):
        expr = compile_sql(parsed(rule["expression"]), c.entity.scope, resolver, ctx)
        checks.append((sa.not_(expr), "", rule["message"]["en"]))
    for pipeline in c.model.bundle.documents("pipelines"):
        if pipeline["entity"] != c.entity.name:
            continue
        stage_column = c.table.c[pipeline["field"]]
        for stage in pipeline["stages"]:
            for name in stage.get("required_fields", []):
                f = c.entity.field(name)
                if f is None or not fieldtypes.get(f.type).stored:
                    continue
                empty = sa.or_(
                    *(c.table.c[col].is_(None) for col in fieldtypes.get(f.type).column_names(f))
                )
                label = stage["label"]["en"]
                checks.append(
                    (
                        sa.and_(stage_column == stage["name"], empty),
                        f"/{name}",
                        f"is required in the stage '{label}'",
                    )
                )
            if "entry_criteria" in stage:
                expr = compile_sql(parsed(stage["entry_criteria"]), c.entity.scope, resolver, ctx)
                checks.append(
                    (
                        sa.and_(stage_column == stage["name"], sa.not_(expr)),
                        f"/{pipeline['field']}",
                        f"the record does not meet the entry criteria of the stage "
                        f"'{stage['label']['en']}': {stage['entry_criteria']}",
                    )
                )
    if not checks:
        return []
    errors = []
    by_id = {record_id: pointer for pointer, record_id in ids}
    for condition, suffix, message in checks:
        query = sa.select(c.table.c.id).where(c.table.c.id.in_(list(by_id)), condition)
        for record_id in c.connection.execute(query).scalars():
            errors.append({"pointer": f"{by_id[record_id]}{suffix}" or "/", "message": message})
    return errors


# -- writing ------------------------------------------------------------------------------


def _next_numbers(c: _Context, f: FieldDef, count: int) -> list[str]:
    """Reserve ``count`` numbers of an auto-number field under a row lock; none given twice.

    One statement for the whole block: a counter row updated once per record would
    leave a chain of row versions that every later update in the transaction walks.
    """
    name = f"{c.entity.name}.{f.name}"
    start = int(f.get("start", 1))
    dialect = postgresql if c.connection.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(sequence)
        .values(name=name, value=start + count - 1)
        .on_conflict_do_update(index_elements=["name"], set_={"value": sequence.c.value + count})
        .returning(sequence.c.value)
    )
    last = c.connection.execute(statement).scalar_one()
    prefix, padding = f.get("prefix", ""), int(f.get("padding", 5))
    return [f"{prefix}{str(value).zfill(padding)}" for value in range(last - count + 1, last + 1)]


@functools.lru_cache(maxsize=1024)
def _unlike_columns(entity: EntityModel) -> frozenset[str]:
    """Return the fields whose value is not simply their column's value."""
    kinds = ("many_to_many", "related_to", "encrypted_text")
    return frozenset(f.name for f in entity.entity.active_fields() if f.type in kinds)


def _columns_of(c: _Context, values: Mapping[str, Any]) -> dict[str, Any]:
    """Turn coerced field values into column values (related-to pairs, ciphertext)."""
    if _unlike_columns(c.entity).isdisjoint(values):
        return dict(values)
    columns: dict[str, Any] = {}
    for name, value in values.items():
        f = c.entity.entity.fields[name]
        if f.type == "many_to_many":
            continue
        if f.type == "related_to":
            columns[f"{name}_entity"] = None if value is None else value[0]
            columns[f"{name}_id"] = None if value is None else value[1]
        elif f.type == "encrypted_text":
            columns[name] = None if value is None else c.cipher.encrypt(value)
        else:
            columns[name] = value
    return columns


def _write_relations(
    c: _Context, record_id: uuid.UUID, values: Mapping[str, Any], pipe: Pipeline | None = None
) -> None:
    run = c.connection.execute if pipe is None else pipe.execute
    for name, link in c.entity.links.items():
        if name not in values:
            continue
        run(link.delete().where(link.c.source_id == record_id))
        targets = values[name] or []
        if targets:
            run(
                link.insert(),
                [{"source_id": record_id, "target_id": t, "created_at": c.now} for t in targets],
            )


def _audit_value(f: FieldDef | None, value: Any) -> Any:
    if f is not None and f.type == "encrypted_text" and value is not None:
        return MASK
    if isinstance(value, tuple):
        return {"entity": value[0], "id": str(value[1])}
    return json_value(value)


def _logged(
    c: _Context,
    operation: str,
    record_id: uuid.UUID | None,
    payload: dict[str, Any],
    changes: Mapping[str, Any],
    detail: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the outbox row and the audit entry of one write (of one record or a group)."""
    event = {
        "created_at": c.now,
        "event": f"record.{operation}",
        "entity": c.entity.name,
        "record_id": record_id,
        "actor_id": c.caller.user_id,
        "payload": {"entity": c.entity.name, "operation": operation, **payload},
    }
    entry = {
        "action": f"record.{operation}",
        "actor_id": c.caller.user_id,
        "actor_name": c.caller.name,
        "entity": c.entity.name,
        "record_id": record_id,
        "changes": changes,
        "detail": detail,
        "at": c.now,
    }
    return event, entry


def _write_logs(
    c: _Context,
    logs: Sequence[tuple[dict[str, Any], dict[str, Any]]],
    *,
    prepared: audittrail.Prepared | None = None,
    pipe: Pipeline | None = None,
) -> None:
    """Write outbox rows, then audit entries: one statement each however many there are.

    ``prepared`` is the entries of ``logs`` already through :func:`audittrail.prepare`.
    The audit append locks the tenant's chain until commit; taking it only
    after every row lock of the write means a bulk write and a single write of
    one of its records cannot wait on each other in a circle (a deadlock on
    PostgreSQL), and other writers wait for less time. One record's event and
    entry can go in the ``pipe`` of its write (sent with its row).
    """
    if len(logs) == 1 and prepared is None:
        ((event, entry),) = logs
        if pipe is None:
            c.connection.execute(_OUTBOX_INSERT, event)
        else:
            pipe.execute(_OUTBOX_INSERT, event, reused=True)
        audittrail.append(c.connection, **entry, pipeline=pipe)
    elif logs:
        c.connection.execute(outbox.insert(), [event for event, _ in logs])
        if prepared is None:
            prepared = audittrail.prepare([entry for _, entry in logs])
        audittrail.append_prepared(c.connection, prepared)


#: One outbox row; ``inline``: nothing reads its generated id back (no RETURNING).
_OUTBOX_INSERT = outbox.insert().inline()


def _record_log(
    c: _Context, operation: str, record_id: uuid.UUID, changes: dict[str, Any], version: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    payload = {"id": str(record_id), "version": version, "changes": changes}
    return _logged(c, operation, record_id, payload, changes, {"version": version})


def _log(
    c: _Context, record_id: uuid.UUID, operation: str, changes: dict[str, Any], version: int
) -> None:
    _write_logs(c, [_record_log(c, operation, record_id, changes, version)])


def _log_each(
    c: _Context, operation: str, entries: Sequence[tuple[uuid.UUID, dict[str, Any], int]]
) -> None:
    """``_log`` for records written one by one, called after the last of them."""
    _write_logs(
        c,
        [
            _record_log(c, operation, record_id, changes, version)
            for record_id, changes, version in entries
        ],
    )


def _log_many(
    c: _Context, operation: str, entries: Sequence[tuple[uuid.UUID, dict[str, Any]]], version: int
) -> None:
    """``_log`` for many records at once: one outbox executemany, one audit lock."""
    _log_each(c, operation, [(record_id, changes, version) for record_id, changes in entries])


#: Records per grouped audit entry and outbox event (decision records 0013 and 0015).
GROUP = 500


def _log_group(
    c: _Context,
    operation: str,
    ids: list[str],
    columns: Mapping[str, list[Any]],
    version: int,
) -> None:
    """Record many new records with one outbox event and one audit entry per :data:`GROUP`.

    ``ids`` are the records' ids, ``columns`` each field's values in that order,
    as the audit trail keeps them (null where a record has none).

    Each audit entry (``record_id`` empty, ``detail.records`` the count) holds
    ``changes`` as ``{"ids": [...], "values": {field: [...]}}``
    (:func:`metacrm.runtime.audittrail.group_changes`): every created record and
    the values it was created with, which is what per-record entries said as
    ``[null, value]`` pairs, with each field's name written once. The outbox event
    carries the ids (``payload.ids``); a consumer reads the records it needs.
    Readers that look for one record (the audit API's ``record_id`` filter) look
    inside such entries too (:func:`metacrm.runtime.audittrail.about_record`).
    The entries of one call are appended together (one lock, one statement).
    Decision records 0013 and 0015.
    """
    _write_logs(c, _group_logs(c, operation, ids, columns, version))


def _group_logs(
    c: _Context,
    operation: str,
    ids: list[str],
    columns: Mapping[str, list[Any]],
    version: int,
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Return the outbox rows and audit entries of :func:`_log_group`."""
    logs = []
    for start in range(0, len(ids), GROUP):
        end = start + GROUP
        part = ids[start:end]
        values = {name: column[start:end] for name, column in columns.items()}
        changes = audittrail.group_changes(part, values)
        payload = {"ids": part, "version": version}
        detail = {"version": version, audittrail.GROUPED: len(part)}
        logs.append(_logged(c, operation, None, payload, changes, detail))
    return logs


def _fetch_many(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    ids: Sequence[uuid.UUID],
    ctx: EvalContext,
) -> list[dict[str, Any]]:
    """Return live records by id, in the order asked, with one SELECT (``_fetch`` for many)."""
    if len(ids) == 1:
        return [_fetch(connection, model, entity, ids[0], ctx)]
    table = entity.table
    query = sa.select(*select_columns(model, entity, ctx)).where(
        table.c.id.in_(ids), table.c.deleted_at.is_(None)
    )
    result = connection.execute(query)
    found = {
        record["id"]: record for record in rows_to_json(entity, list(result.keys()), result.all())
    }
    records = []
    for record_id in ids:
        record = found.get(str(record_id))
        if record is None:
            raise RecordNotFound(f"no {entity.name} record with id {record_id}")
        records.append(record)
    attach_relations(connection, entity, records)
    return records


def _integrity(c: _Context, exc: sa.exc.IntegrityError, pointer: str = "") -> RecordInvalid:
    """Translate a constraint violation that slipped past the checks (a race) into errors."""
    message = str(exc.orig)
    for f in c.entity.entity.active_fields():
        if constraint_name("uq", c.entity.name, f.name) in message:
            return RecordInvalid(
                [
                    {
                        "pointer": f"{pointer}/{f.name}",
                        "message": "must be unique; another record has this value",
                    }
                ]
            )
        if constraint_name("fk", c.entity.name, f.name) in message:
            return RecordInvalid(
                [
                    {
                        "pointer": f"{pointer}/{f.name}",
                        "message": "points at a record that does not exist",
                    }
                ]
            )
    return RecordInvalid(
        [
            {
                "pointer": pointer or "/",
                "message": "the change conflicts with other records (a constraint refused it)",
            }
        ]
    )


#: The columns every created row gets from the write itself (the same for the whole call).
_STAMPS = ("created_at", "created_by", "updated_at", "updated_by", "version")


@dataclass
class ReadAhead:
    """A grouped bulk create's payloads, read before their turn (:func:`read_ahead`)."""

    context: _Context
    items: Sequence[Any]
    #: The payloads read a field at a time, or None when the per-row path must read them.
    columns: _Columns | None
    #: What the column path writes that needs no database (None with ``columns``).
    staged: _Staged | None


def read_ahead(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    items: Sequence[Any],
    caller: Caller,
    cipher: FieldCipher,
) -> ReadAhead:
    """Do the part of a grouped bulk create that needs no database, for a later call.

    ``create_many(..., bulk=True, grouped=True)`` given the answer instead of the
    payloads does the rest. An import reads its next batch this way while the
    server is still storing the current one, so that the two overlap; a batch
    this reading refuses is read payload by payload in its turn, as always, and
    its errors are worded and raised then.
    """
    c = _context(connection, model, entity, caller, cipher)
    columns = _read_columns(c, items)
    return ReadAhead(c, items, columns, None if columns is None else _stage(c, columns))


@_in_savepoint
def create_many(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    items: Sequence[Any] | ReadAhead,
    caller: Caller,
    cipher: FieldCipher,
    *,
    bulk: bool = False,
    returning: bool = True,
    grouped: bool = False,
    meanwhile: Callable[[], object] | None = None,
) -> list[dict[str, Any]]:
    """Create records, all or none; errors point into the list (``/3/name``) when ``bulk``.

    Without ``returning`` the records are not read back (an import needs only how
    many): each answer is ``{"id": ...}``. With ``grouped`` the records created by
    the call share one audit entry and one outbox event (see :func:`_log_group`)
    instead of one each: an import writes thousands of records a second, and an
    entry of its own per record cost more than the record. ``meanwhile`` (imports:
    reading the file's next batch) may be run while the server stores a grouped
    batch's rows, or not at all. ``items`` may be a :func:`read_ahead` of the
    payloads (grouped bulk creates only), made with the same arguments.
    """
    if isinstance(items, ReadAhead):
        if not (bulk and grouped):
            raise TypeError("a read-ahead batch is for grouped bulk creates")
        c, columns, staged, items = items.context, items.columns, items.staged, items.items
        c.connection = connection  # the savepoint's connection (the same transaction)
    else:
        c = _context(connection, model, entity, caller, cipher)
        columns = _read_columns(c, items) if bulk else None
        staged = None
    prepared: list[tuple[str, dict[str, Any]]] = []
    errors: list[dict[str, str]] = []
    if columns is not None and grouped:
        return _create_columns(c, staged or _stage(c, columns), returning, meanwhile)
    batch = None if columns is None else columns.rows()
    if batch is not None:
        prepared = [(f"/{index}", values) for index, values in enumerate(batch)]
    for index, data in enumerate(items if batch is None else ()):
        pointer = f"/{index}" if bulk else ""
        values, problems = _validate(c, data, creating=True, pointer=pointer)
        if problems:
            errors.extend(problems)
        prepared.append((pointer, values))
    # Values that passed their own checks are checked against the data too, so one
    # answer lists every problem.
    errors.extend(_check_references(c, prepared))
    errors.extend(_check_unique(c, [(p, v, None) for p, v in prepared]))
    if errors:
        raise _refused(c, errors)
    numbers = {
        f.name: iter(_next_numbers(c, f, len(prepared)))
        for f in entity.entity.active_fields()
        if f.type == "auto_number"
    }
    stamps = dict(zip(_STAMPS, (c.now, caller.user_id, c.now, caller.user_id, 1), strict=True))
    rows: list[tuple[str, uuid.UUID, dict[str, Any], dict[str, Any]]] = []
    for pointer, values in prepared:
        record_id = uuid7()
        owner, team = c.owners.get(pointer, (caller.user_id, caller.team_id))
        row = {"id": record_id, "owner_id": owner, "team_id": team, **_columns_of(c, values)}
        for name, block in numbers.items():
            row[name] = next(block)
        rows.append((pointer, record_id, row, values))
    created = [(pointer, record_id) for pointer, record_id, _, _ in rows]
    try:
        _insert(c, stamps, [row for _, _, row, _ in rows])
        if entity.links:
            for _pointer, record_id, _row, values in rows:
                _write_relations(c, record_id, values)
    except sa.exc.IntegrityError as exc:
        raise _refused(c, _integrity(c, exc).errors) from None
    errors = _check_rules(c, created)
    if errors:
        raise _refused(c, errors)
    audited = _audited_fields(entity)
    entries = []
    for _pointer, record_id, row, values in rows:
        created_with = dict(values)
        for name in audited.keys() & values.keys():
            created_with[name] = _audit_value(audited[name], values[name])
        for name in numbers:
            created_with[name] = row[name]
        if row["owner_id"] != caller.user_id:
            created_with["owner_id"] = json_value(row["owner_id"])
        entries.append((record_id, created_with))
    if grouped and len(entries) > 1:
        names = list(dict.fromkeys(name for _, new in entries for name in new))
        _log_group(
            c,
            "create",
            [str(record_id) for record_id, _ in entries],
            {name: [new.get(name) for _, new in entries] for name in names},
            1,
        )
    else:
        _log_many(
            c,
            "create",
            [(r, {name: [None, value] for name, value in new.items()}) for r, new in entries],
            1,
        )
    if not returning:
        return [{"id": str(record_id)} for _, record_id in created]
    shown_model, shown = _shown(c)
    return _fetch_many(connection, shown_model, shown, [r for _, r in created], c.eval_context())


@dataclass
class _Staged:
    """A grouped bulk create's columns as they are written (:func:`_stage`)."""

    #: Every field's column, defaults filled in (:meth:`_Columns.filled`).
    names: list[str]
    columns: list[list[Any]]
    #: The records' ids as the integers of their UUIDs (:func:`_new_ids`).
    ids: range
    #: The table's columns of those fields (related-to pairs, ciphertext).
    stored: dict[str, list[Any]]

    @property
    def count(self) -> int:
        return len(self.ids)


def _stage(c: _Context, batch: _Columns) -> _Staged:
    """Return what a grouped bulk create writes that needs no database: ids and columns."""
    names, columns = batch.filled()
    stored: dict[str, list[Any]] = {}
    unlike = _unlike_columns(c.entity)
    for name, column in zip(names, columns, strict=True):
        if name not in unlike:
            stored[name] = column
            continue
        kind = c.entity.entity.fields[name].type
        if kind == "related_to":
            stored[f"{name}_entity"] = [None if v is None else v[0] for v in column]
            stored[f"{name}_id"] = [None if v is None else v[1] for v in column]
        elif kind == "encrypted_text":
            stored[name] = [None if v is None else c.cipher.encrypt(v) for v in column]
    return _Staged(names, columns, _new_ids(batch.count), stored)


def _create_columns(
    c: _Context,
    batch: _Staged,
    returning: bool,
    meanwhile: Callable[[], object] | None = None,
) -> list[dict[str, Any]]:
    """Create the records of a grouped bulk create (an import batch) a column at a time.

    What :func:`create_many` does row by row, done per field: the same checks, the
    rows by ``COPY`` (or one ``executemany``), one grouped audit entry whose
    ``changes`` are columns already. A batch here has no per-record owner (an
    ``owner_id`` in a payload sends it down the row path), so every record is the
    caller's and in the caller's team.
    """
    entity, caller = c.entity, c.caller
    names, columns, ids = batch.names, batch.columns, batch.ids
    if _reference_fields(entity) or _unique_fields(entity):
        prepared = [
            (f"/{index}", dict(zip(names, row, strict=True)))
            for index, row in enumerate(zip(*columns, strict=True))
        ]
        errors = _check_references(c, prepared)
        errors.extend(_check_unique(c, [(p, v, None) for p, v in prepared]))
        if errors:
            raise _refused(c, errors)
    numbers = {
        f.name: _next_numbers(c, f, batch.count)
        for f in entity.entity.active_fields()
        if f.type == "auto_number"
    }
    constants = dict(
        zip(_STAMPS, (c.now, caller.user_id, c.now, caller.user_id, 1), strict=True),
        owner_id=caller.user_id,
        team_id=caller.team_id,
    )
    # The id column's UUIDs are made as COPY takes them (or not at all, see _IdColumn):
    # kept for the batch, 2,000 of them outlived young garbage collections and made
    # full ones more frequent.
    stored: dict[str, Iterable[Any]] = {"id": _IdColumn(ids), **numbers, **batch.stored}
    audited = _audited_fields(entity)

    def audit_logs() -> tuple[list[str], list[Any], audittrail.Prepared]:
        values = {
            name: _audit_column(audited[name], column) if name in audited else column
            for name, column in zip(names, columns, strict=True)
        }
        values.update(numbers)
        keys = list(map(_uuid_text, ids))
        logs = _group_logs(c, "create", keys, values, 1)
        prepared = audittrail.prepare([entry for _, entry in logs])
        if meanwhile is not None:
            meanwhile()
        return keys, logs, prepared

    try:
        # The batch's audit entries are made (and ``meanwhile`` run) while the server is
        # busy with its rows.
        keys, logs, prepared = _write_columns(c, constants, stored, batch.count, audit_logs)
        if entity.links:
            linked = [
                (name, column)
                for name, column in zip(names, columns, strict=True)
                if name in entity.links
            ]
            for index, record_id in enumerate(ids):
                values = {name: column[index] for name, column in linked}
                _write_relations(c, _uuid(record_id), values)
    except sa.exc.IntegrityError as exc:
        raise _refused(c, _integrity(c, exc).errors) from None
    errors = _check_rules(c, ((f"/{index}", _uuid(n)) for index, n in enumerate(ids)))
    if errors:
        raise _refused(c, errors)
    _write_logs(c, logs, prepared=prepared)
    if not returning:
        return [{"id": key} for key in keys]
    shown_model, shown = _shown(c)
    return _fetch_many(c.connection, shown_model, shown, list(map(_uuid, ids)), c.eval_context())


#: The random bits of a UUIDv7 below its variant (RFC 9562's ``rand_b``).
_RAND_B = (1 << 62) - 1


def _new_ids(count: int) -> range:
    """Return ``count`` new record ids: the integers of UUIDv7s in ascending order.

    One UUIDv7 is drawn and its random part counted up for the rest, which RFC
    9562 allows for ids made together (its "monotonic random" method); drawing
    one per record (a system call for its random bits) cost more than the record's
    COPY. The next draw of the process has a later timestamp, so none repeats.
    """
    while True:
        first = uuid7().int
        if (first & _RAND_B) + count <= _RAND_B:  # never carries into the variant bits
            return range(first, first + count)


def _uuid(value: int) -> uuid.UUID:
    """Return the UUID of an integer from :func:`_new_ids`."""
    return uuid.UUID(int=value)


@dataclass(frozen=True)
class _IdColumn:
    """A column of new record ids, held as their integers (:func:`_new_ids`).

    Iterated it gives UUIDs, made one at a time; a binary COPY takes the ids' 16
    bytes without making them (:func:`_uuids_as_bytes`).
    """

    ids: range

    def __iter__(self) -> Iterator[uuid.UUID]:
        return map(_uuid, self.ids)

    def binary(self) -> Iterator[bytes]:
        """Return each id's 16 bytes, its binary COPY form (made in C)."""
        return map(int.to_bytes, self.ids, itertools.repeat(16), itertools.repeat("big"))


def _uuid_text(value: int) -> str:
    """Return ``str(uuid.UUID(int=value))`` without making the UUID."""
    digits = f"{value:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def _audit_column(f: FieldDef, column: list[Any]) -> list[Any]:
    """Return a column of one field's values as the audit trail keeps them."""
    if f.type == "encrypted_text" or f.type == "related_to":
        return [_audit_value(f, value) for value in column]
    return json_values(column)


#: Field types whose values are already the JSON the audit trail keeps (text, numbers).
_JSON_NATIVE = frozenset(
    {
        "text",
        "long_text",
        "rich_text",
        "email",
        "phone",
        "url",
        "single_select",
        "integer",
        "boolean",
        "auto_number",
    }
)


@functools.lru_cache(maxsize=1024)
def _audited_fields(entity: EntityModel) -> dict[str, FieldDef]:
    """Return the fields whose values need :func:`_audit_value` (all but :data:`_JSON_NATIVE`)."""
    return {f.name: f for f in entity.entity.active_fields() if f.type not in _JSON_NATIVE}


def _insert(c: _Context, stamps: Mapping[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    """Insert new rows with the driver's fastest bulk path, in the caller's transaction.

    PostgreSQL takes them by ``COPY ... FROM STDIN``, SQLite by one ``executemany``;
    each value goes through its column type's bind processing first, as it would
    through an INSERT statement, and ``stamps`` (the same for every row) once.
    A column some rows leave out is NULL for them, which is what leaving it out
    means (a column with a default is never left out: defaults are filled in by
    validation); when one has a default anyway, rows go by key set.
    """
    names = list(stamps)
    seen = set(names)
    for row in rows:
        if len(row) + len(stamps) != len(names) or not seen.issuperset(row):
            for name in row:
                if name not in seen:
                    seen.add(name)
                    names.append(name)
    table = c.table
    partial = [n for n in names if n not in stamps and any(n not in row for row in rows)]
    if any(
        table.c[n].server_default is not None or table.c[n].default is not None for n in partial
    ):
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(row), []).append(row)
        for key, group in groups.items():
            _write_rows(c, [*stamps, *key], stamps, group)
        return
    _write_rows(c, names, stamps, rows)


def _write_rows(
    c: _Context, names: Sequence[str], stamps: Mapping[str, Any], rows: Sequence[dict[str, Any]]
) -> None:
    """Send rows (the columns ``names``; ``stamps`` the same for every row) to the table."""
    constants = {name: stamps[name] for name in names if name in stamps}
    stored = {name: [row.get(name) for row in rows] for name in names if name not in stamps}
    _write_columns(c, constants, stored, len(rows))


def _write_columns(
    c: _Context,
    constants: Mapping[str, Any],
    columns: Mapping[str, Iterable[Any]],
    count: int,
    meanwhile: Callable[[], _T] | None = None,
) -> _T | None:
    """Send ``count`` rows, given a column at a time, through the driver connection of ``c``.

    ``constants`` are columns with one value for every row; ``columns`` are read
    once (an iterator will do). ``meanwhile`` is run once the rows are sent and
    before the server is waited for (PostgreSQL takes COPY rows as they come), and
    its result returned. The driver's own bulk
    paths skip SQLAlchemy's per-row parameter handling, which cost more than the
    database's work for a 500-row batch; each value goes through its column type's
    bind processing first (a constant once), as it would through an INSERT. A
    driver error goes through SQLAlchemy's handling (an IntegrityError stays one,
    a lost connection is invalidated), so callers see no difference. Table and
    schema names are quoted identifiers from validated metadata; values are never
    part of the statement.
    """
    dialect = c.connection.dialect
    names = [*constants, *columns]
    values: list[Iterable[Any]] = []
    for name in names:
        process = _bind_processor(c.table.c[name], dialect)
        if name in constants:
            value = constants[name]
            values.append(itertools.repeat(process(value) if process else value, count))
        else:
            column = columns[name]
            values.append(list(map(process, column)) if process else column)
    quote = dialect.identifier_preparer.quote
    target = quote(c.table.name)
    schema = (c.connection.get_execution_options().get("schema_translate_map") or {}).get(None)
    if schema:
        target = f"{dialect.identifier_preparer.quote_schema(schema)}.{target}"
    listed = ", ".join(quote(name) for name in names)
    cursor = c.connection.connection.cursor()
    try:
        if dialect.name == "postgresql":
            types = [_binary_copy_type(c.table.c[name], dialect) for name in names]
            binary = None not in types
            if binary:
                _uuids_as_bytes(cursor, names, constants, types, values, count)
            statement = f"COPY {target} ({listed}) FROM STDIN" + (
                " (FORMAT BINARY)" if binary else ""
            )
            result = _copy_in(
                cursor, statement, types if binary else None, zip(*values, strict=True), meanwhile
            )
        else:
            statement = f"INSERT INTO {target} ({listed}) VALUES ({', '.join('?' * len(names))})"
            cursor.executemany(statement, zip(*values, strict=True))
            result = meanwhile() if meanwhile else None
    except c.connection.dialect.loaded_dbapi.Error as exc:
        # SQLAlchemy's own handling: the same exception classes as an INSERT would
        # raise, a lost connection invalidated (and answered 503), handle_error events.
        c.connection._handle_dbapi_exception(exc, statement, None, cursor, None)
        raise  # not reached: the handler raises
    finally:
        cursor.close()
    return result


def _uuids_as_bytes(
    cursor: Any,
    names: Sequence[str],
    constants: Mapping[str, Any],
    types: list[str | None],
    values: list[Iterable[Any]],
    count: int,
) -> None:
    """Send a binary COPY's uuid constants (owner, creator, updater) and new ids as bytes.

    A uuid's binary COPY form is its 16 bytes, which is what ``bytea`` sends for
    bytes. psycopg's uuid dumper is Python, called once per row and column (about
    0.4 µs each, and the id's UUID made for it 0.7 µs); its bytes dumper, registered
    on this cursor, is C.
    """
    from psycopg.types.string import BytesBinaryDumper  # PostgreSQL only: see _copy_in

    cursor.adapters.register_dumper(bytes, BytesBinaryDumper)
    for index, name in enumerate(names):
        if types[index] != "uuid":
            continue
        value, column = constants.get(name), values[index]
        if isinstance(value, uuid.UUID):
            values[index] = itertools.repeat(value.bytes, count)
            types[index] = "bytea"
        elif isinstance(column, _IdColumn):
            values[index] = column.binary()
            types[index] = "bytea"


def _copy_in(
    cursor: Any,
    statement: str,
    types: Sequence[str] | None,
    rows: Iterable[Sequence[Any]],
    meanwhile: Callable[[], _T] | None,
) -> _T | None:
    """Run ``COPY ... FROM STDIN``: send every row to the server, then run ``meanwhile``.

    psycopg formats rows into blocks of 32 kB and keeps the last, short one until
    the COPY ends. Formatting through a second :class:`psycopg.Copy` whose writer
    is the COPY's (``FileWriter``) ends with that block written too, and the COPY's
    writer (``flush_threshold=0``) waits until libpq has handed each block to the
    socket, so the server stores every row while ``meanwhile`` runs; kept back, the
    last block left 8-9 ms of a 2,000-row batch's storing to be waited for at the
    end (decision record 0018). ``types`` are the columns' types for a binary COPY,
    None for text. psycopg is imported here, not with the module, so that a process
    that only writes SQLite (the embedded default) does not load it (about 9 MB).
    """
    from psycopg import Copy
    from psycopg.copy import FileWriter, LibpqWriter

    with cursor.copy(statement, writer=LibpqWriter(cursor, flush_threshold=0)) as copy:
        with Copy(cursor, binary=types is not None, writer=FileWriter(copy)) as formatted:
            if types is not None:
                formatted.set_types(types)
            for row in rows:
                formatted.write_row(row)
        return meanwhile() if meanwhile else None


@functools.lru_cache(maxsize=4096)
def _bind_processor(column: sa.Column[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    """Return a column's bind processing for ``dialect`` (built once, not per batch)."""
    return column.type.dialect_impl(dialect).bind_processor(dialect)


#: PostgreSQL types whose values COPY may send in binary: the driver's binary form of
#: what their bind processing gives (UUID, datetime, str, Decimal, int, date, bool).
_BINARY_COPY = frozenset(
    {
        "uuid",
        "timestamp with time zone",
        "varchar",
        "text",
        "numeric",
        "bigint",
        "integer",
        "smallint",
        "date",
        "boolean",
    }
)


@functools.lru_cache(maxsize=4096)
def _binary_copy_type(column: sa.Column[Any], dialect: Dialect) -> str | None:
    """Return a column's PostgreSQL type for a binary COPY, or None if it goes as text.

    Binary rows spare the server parsing every value's text (a timestamp, a UUID,
    a decimal) and the driver writing it: a batch of D4 rows went in 1.5 times as
    fast. Other types (JSON, floats, times) keep the text format for the table.
    """
    compiled = dialect.type_compiler_instance.process(column.type.dialect_impl(dialect))
    name = compiled.split("(")[0].strip().lower()
    return name if name in _BINARY_COPY else None


@_in_savepoint
def create(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    data: Any,
    caller: Caller,
    cipher: FieldCipher,
) -> dict[str, Any]:
    """Create one record and return it as stored.

    What :func:`create_many` does for one item, with the row, its relations, its
    outbox event, its audit entry and the read of the stored record sent
    together (one round trip on PostgreSQL, :mod:`metacrm.runtime.pipeline`).
    """
    c = _context(connection, model, entity, caller, cipher)
    values = _checked(c, data, None)
    record_id = uuid7()
    owner, team = c.owners.get("", (caller.user_id, caller.team_id))
    row = {"id": record_id, "owner_id": owner, "team_id": team, **_columns_of(c, values)}
    row.update(zip(_STAMPS, (c.now, caller.user_id, c.now, caller.user_id, 1), strict=True))
    audited = _audited_fields(entity)
    created_with = dict(values)
    for name in audited.keys() & values.keys():
        created_with[name] = _audit_value(audited[name], values[name])
    for f in entity.entity.active_fields():
        if f.type == "auto_number":
            row[f.name] = created_with[f.name] = _next_numbers(c, f, 1)[0]
    if owner != caller.user_id:
        created_with["owner_id"] = json_value(owner)
    changes = {name: [None, value] for name, value in created_with.items()}
    return _written(c, record_id, row, values, "create", changes, 1)


def _checked(c: _Context, data: Any, record_id: uuid.UUID | None) -> dict[str, Any]:
    """Validate one payload, its references and its unique values; RecordInvalid if refused.

    ``record_id`` is None for a create, else the record an update changes.
    """
    values, errors = _validate(c, data, creating=record_id is None)
    errors.extend(_check_references(c, [("", values)]))
    errors.extend(_check_unique(c, [("", values, record_id)]))
    if errors:
        raise _refused(c, errors)
    return values


def _written(
    c: _Context,
    record_id: uuid.UUID,
    row: Mapping[str, Any] | None,
    values: Mapping[str, Any],
    operation: str,
    changes: dict[str, Any],
    version: int,
) -> dict[str, Any]:
    """Write one record's change (a new ``row`` or changed columns), log it and read it back.

    The row, its relations, the outbox event, the audit entry and the read of
    the stored record go in one pipeline; validation rules are checked after,
    in the same transaction, and refuse the whole write.
    """
    shown_model, shown = _shown(c)
    dialect = c.connection.dialect
    (read, names), shared = _read_statement(shown_model, shown, c.eval_context(), False, dialect)
    try:
        with pipelined(c.connection) as pipe:
            if operation == "create":
                pipe.execute(_insert_statement(c.entity), row, reused=True)
            else:
                pipe.execute(
                    _update_statement(c.entity), {**(row or {}), _ID: record_id}, reused=True
                )
            _write_relations(c, record_id, values, pipe)
            _write_logs(c, [_record_log(c, operation, record_id, changes, version)], pipe=pipe)
            fetched = pipe.execute(read, {"read_record_id": record_id}, reused=shared)
    except sa.exc.IntegrityError as exc:
        raise _refused(c, _integrity(c, exc).errors) from None
    errors = _check_rules(c, [("", record_id)])
    if errors:
        raise _refused(c, errors)
    record = rows_to_json(shown, names, fetched.rows(), dialect)[0]
    attach_relations(c.connection, shown, [record])
    return record


#: The bound id of :func:`_update_statement` (fields never start with an underscore).
_ID = "_record_id"


def _locked_row(
    c: _Context, record_id: uuid.UUID, scope: sa.ColumnElement[bool] | None
) -> Mapping[str, Any]:
    """Read and lock one live record (``_current``): a statement that waits for its answer.

    It runs in a pipeline of its own so that it takes the same path as the
    write's statements (compiled once, sent on the driver's cursor).
    """
    locking = _lock_statement(c.entity, c.connection.dialect.name == "postgresql")
    if scope is not None:
        locking = locking.where(scope)
    with pipelined(c.connection) as pipe:
        locked = pipe.execute(locking, {_ID: record_id}, reused=scope is None)
    found = locked.mappings()
    if not found:
        raise RecordNotFound(f"no live {c.entity.name} record with id {record_id}")
    return found[0]


@functools.lru_cache(maxsize=1024)
def _lock_statement(entity: EntityModel, postgresql: bool) -> sa.Select[Any]:
    """Return the SELECT (FOR UPDATE on PostgreSQL) of one live record by id, as ``_current``."""
    table = entity.table
    query = sa.select(table).where(
        table.c.id == sa.bindparam(_ID, type_=table.c.id.type), table.c.deleted_at.is_(None)
    )
    return query.with_for_update() if postgresql else query


@functools.lru_cache(maxsize=1024)
def _insert_statement(entity: EntityModel) -> sa.Insert:
    """Return the INSERT of one record; the columns are the parameters given."""
    return entity.table.insert().inline()


@functools.lru_cache(maxsize=1024)
def _update_statement(entity: EntityModel) -> sa.Update:
    """Return the UPDATE of one record by id; the columns set are the parameters given."""
    table = entity.table
    return table.update().where(table.c.id == sa.bindparam(_ID, type_=table.c.id.type))


def _current(
    c: _Context,
    record_id: uuid.UUID,
    *,
    deleted: bool = False,
    scope: sa.ColumnElement[bool] | None = None,
) -> Mapping[str, Any]:
    live = c.table.c.deleted_at.is_not(None) if deleted else c.table.c.deleted_at.is_(None)
    query = sa.select(c.table).where(c.table.c.id == record_id, live)
    if scope is not None:
        query = query.where(scope)
    dialect = c.connection.dialect.name
    row = c.connection.execute(query.with_for_update() if dialect == "postgresql" else query)
    found = row.mappings().first()
    if found is None:
        where = "in the recycle bin" if deleted else "live"
        raise RecordNotFound(f"no {where} {c.entity.name} record with id {record_id}")
    return found


def _old_value(c: _Context, f: FieldDef, row: Mapping[str, Any]) -> Any:
    if f.type == "related_to":
        target = row[f"{f.name}_id"]
        return None if target is None else (row[f"{f.name}_entity"], target)
    if f.type == "many_to_many":
        link = c.entity.links[f.name]
        query = sa.select(link.c.target_id).where(link.c.source_id == row["id"])
        return sorted(c.connection.execute(query).scalars(), key=str)
    return row[f.name]


@_in_savepoint
def update_many(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    items: Sequence[tuple[uuid.UUID, Any, int | None]],
    caller: Caller,
    cipher: FieldCipher,
    *,
    bulk: bool = False,
    scope: sa.ColumnElement[bool] | None = None,
) -> list[dict[str, Any]]:
    """Apply partial updates ``(id, patch, expected_version)``, all or none."""
    c = _context(connection, model, entity, caller, cipher)
    prepared = []
    errors: list[dict[str, str]] = []
    for index, (record_id, data, expected) in enumerate(items):
        pointer = f"/{index}" if bulk else ""
        values, problems = _validate(c, data, creating=False, pointer=pointer)
        errors.extend(problems)
        prepared.append((pointer, record_id, values, expected))
    errors.extend(_check_references(c, [(p, v) for p, _, v, _ in prepared]))
    errors.extend(_check_unique(c, [(p, v, i) for p, i, v, _ in prepared]))
    if errors:
        raise _refused(c, errors)
    done = []
    logged: list[tuple[uuid.UUID, dict[str, Any], int]] = []
    for pointer, record_id, values, expected in prepared:
        row = _current(c, record_id, scope=scope)
        if expected is not None and row["version"] != expected:
            raise VersionMismatch(row["version"])
        changes = _diff(c, pointer, values, row)
        if not changes:
            done.append((pointer, record_id))
            continue
        version = row["version"] + 1
        columns = _changed_columns(c, pointer, values, changes, version)
        try:
            connection.execute(
                entity.table.update().where(entity.table.c.id == record_id).values(columns)
            )
            _write_relations(c, record_id, {k: v for k, v in values.items() if k in changes})
        except sa.exc.IntegrityError as exc:
            raise _refused(c, _integrity(c, exc, pointer).errors) from None
        logged.append((record_id, changes, version))
        done.append((pointer, record_id))
    errors = _check_rules(c, done)
    if errors:
        raise _refused(c, errors)
    _log_each(c, "update", logged)
    shown_model, shown = _shown(c)
    return [_fetch(connection, shown_model, shown, r, c.eval_context()) for _, r in done]


def _diff(
    c: _Context, pointer: str, values: Mapping[str, Any], row: Mapping[str, Any]
) -> dict[str, Any]:
    """Return what an update changes in a stored row, as ``{field: [old, new]}`` for the log."""
    changes = {}
    fields = c.entity.entity.fields
    for name, value in values.items():
        f = fields[name]
        old = _old_value(c, f, row)
        compare_old = MASK if f.type == "encrypted_text" else old
        compare_new = MASK if f.type == "encrypted_text" else value
        if f.type == "many_to_many":
            compare_new = sorted(value or [], key=str)
        if compare_old != compare_new or f.type == "encrypted_text":
            changes[name] = [_audit_value(f, old), _audit_value(f, value)]
    owner = c.owners.get(pointer)
    if owner is not None and owner[0] != row["owner_id"]:
        changes["owner_id"] = [json_value(row["owner_id"]), json_value(owner[0])]
    return changes


def _changed_columns(
    c: _Context, pointer: str, values: Mapping[str, Any], changes: Mapping[str, Any], version: int
) -> dict[str, Any]:
    """Return the columns an update sets: the changed fields, the owner, the stamps."""
    columns = _columns_of(c, {k: v for k, v in values.items() if k in changes})
    owner = c.owners.get(pointer)
    if "owner_id" in changes and owner is not None:
        # The record follows its new owner into the owner's team.
        columns.update(owner_id=owner[0], team_id=owner[1])
    columns.update(updated_at=c.now, updated_by=c.caller.user_id, version=version)
    return columns


@_in_savepoint
def update(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    record_id: uuid.UUID,
    data: Any,
    caller: Caller,
    cipher: FieldCipher,
    expected_version: int | None = None,
    scope: sa.ColumnElement[bool] | None = None,
) -> dict[str, Any]:
    """Apply a partial update to one record and return it as stored.

    What :func:`update_many` does for one item: the row is read and locked
    first (its version and old values decide what is written), then the change,
    its log and the read of the stored record go together (:func:`_written`).
    """
    c = _context(connection, model, entity, caller, cipher)
    values = _checked(c, data, record_id)
    row = _locked_row(c, record_id, scope)
    if expected_version is not None and row["version"] != expected_version:
        raise VersionMismatch(row["version"])
    changes = _diff(c, "", values, row)
    if not changes:
        # Nothing to write; the rules still hold the record as it is.
        errors = _check_rules(c, [("", record_id)])
        if errors:
            raise _refused(c, errors)
        shown_model, shown = _shown(c)
        return _fetch(connection, shown_model, shown, record_id, c.eval_context())
    version = row["version"] + 1
    columns = _changed_columns(c, "", values, changes, version)
    changed = {k: v for k, v in values.items() if k in changes}
    return _written(c, record_id, columns, changed, "update", changes, version)


@_in_savepoint
def _set_deleted(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    ids: Iterable[tuple[uuid.UUID, int | None]],
    caller: Caller,
    *,
    restoring: bool,
    scope: sa.ColumnElement[bool] | None = None,
) -> None:
    c = _context(connection, model, entity, caller, FieldCipher("unused-for-deletes"))
    logged: list[tuple[uuid.UUID, dict[str, Any], int]] = []
    for record_id, expected in ids:
        row = _current(c, record_id, deleted=restoring, scope=scope)
        if expected is not None and row["version"] != expected:
            raise VersionMismatch(row["version"])
        version = row["version"] + 1
        connection.execute(
            entity.table.update()
            .where(entity.table.c.id == record_id)
            .values(
                deleted_at=None if restoring else c.now,
                updated_at=c.now,
                updated_by=caller.user_id,
                version=version,
            )
        )
        change = [json_value(row["deleted_at"]), None if restoring else json_value(c.now)]
        logged.append((record_id, {"deleted_at": change}, version))
    _log_each(c, "restore" if restoring else "delete", logged)


def delete_many(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    ids: Iterable[tuple[uuid.UUID, int | None]],
    caller: Caller,
    scope: sa.ColumnElement[bool] | None = None,
) -> None:
    """Move records to the recycle bin, all or none."""
    _set_deleted(connection, model, entity, ids, caller, restoring=False, scope=scope)


def restore(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    record_id: uuid.UUID,
    caller: Caller,
    scope: sa.ColumnElement[bool] | None = None,
) -> dict[str, Any]:
    """Bring a record back from the recycle bin and return it."""
    _set_deleted(
        connection, model, entity, [(record_id, None)], caller, restoring=True, scope=scope
    )
    c = _context(connection, model, entity, caller, FieldCipher("unused"))
    shown_model, shown = _shown(c)
    return _fetch(connection, shown_model, shown, record_id, c.eval_context())


@_in_savepoint
def purge(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    record_id: uuid.UUID,
    caller: Caller,
    scope: sa.ColumnElement[bool] | None = None,
) -> None:
    """Delete a record from the recycle bin for good (lookups act as their on_delete says)."""
    c = _context(connection, model, entity, caller, FieldCipher("unused-for-purges"))
    row = _current(c, record_id, deleted=True, scope=scope)
    try:
        connection.execute(entity.table.delete().where(entity.table.c.id == record_id))
    except sa.exc.IntegrityError:
        raise RecordInvalid(
            [
                {
                    "pointer": "/",
                    "message": "other records still point at this "
                    "one through a lookup that restricts deletion",
                }
            ]
        ) from None
    _log(
        c, record_id, "purge", {"deleted_at": [json_value(row["deleted_at"]), None]}, row["version"]
    )


def decrypt_field(
    connection: Connection,
    entity: EntityModel,
    record_id: uuid.UUID,
    field_name: str,
    cipher: FieldCipher,
) -> str | None:
    """Return the plaintext of an encrypted field (callers check the right to see it)."""
    f = entity.field(field_name)
    if f is None or f.type != "encrypted_text":
        raise ValueProblem(f"'{field_name}' is not an encrypted field")
    value = connection.execute(
        sa.select(entity.table.c[field_name]).where(entity.table.c.id == record_id)
    ).scalar()
    return None if value is None else cipher.decrypt(value)
