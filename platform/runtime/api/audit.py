"""The audit API: search the tenant's audit trail and export it as CSV.

Only members whose roles hold the ``view_audit`` capability get in (403
``forbidden`` for everyone else, before anything is read). Entries are shown
newest first with keyset pagination over ``seq``; the cursor is signed per
tenant, so it can be handed back but not forged or carried to another tenant.

What a viewer may not see stays out of the view: fields that field-level
security hides from the viewer are removed from an entry's ``changes`` (their
names included: a hidden field never leaves the server), and encrypted fields
were masked when the entry was written. An export is itself an audit entry,
written before the first row is sent.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import io
import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from flask import (
    Blueprint,
    Flask,
    Response,
    has_request_context,
    jsonify,
    request,
    stream_with_context,
)

from metacrm.runtime import audittrail, spreadsheet
from metacrm.runtime import cursor as cursors
from metacrm.runtime.api.context import RequestContext, platform, resolve
from metacrm.runtime.api.problem import abort, invalid_query
from metacrm.runtime.api.viewer import viewer_of, visible_changes
from metacrm.runtime.store import audit

bp = Blueprint("audit_api", __name__, url_prefix="/t/<tenant>/api/v1/audit")

CAPABILITY = "view_audit"
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_ACTIONS = 20
#: Rows read per round trip while an export streams.
EXPORT_BATCH = 1000
SEARCH_PARAMETERS = ("actor", "action", "entity", "record_id", "since", "until")
LIST_PARAMETERS = (*SEARCH_PARAMETERS, "limit", "cursor")
EXPORT_PARAMETERS = (*SEARCH_PARAMETERS, "format")
CSV_COLUMNS = (
    "seq",
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
    "prev_hash",
    "hash",
)
_ACTION_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*(\.\*)?$")
_ENTITY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def init_app(app: Flask) -> None:
    """Register the audit API, and note each request's client address for its entries."""
    app.register_blueprint(bp)

    audittrail.set_client_source(_request_address)


def _request_address() -> str | None:
    """The address of the request being served in this thread (None outside one)."""
    return request.remote_addr if has_request_context() else None


def _only(names: tuple[str, ...]) -> None:
    """Refuse unknown parameters: a typo must not silently widen a search."""
    for name in request.args:
        if name not in names:
            invalid_query(
                name[:40].replace("~", "~0").replace("/", "~1"),
                "is not a parameter here (known: " + ", ".join(names) + ")",
            )


def _one(name: str, max_length: int = 200) -> str | None:
    values = request.args.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        invalid_query(name, "is given more than once")
    value = values[0]
    if len(value) > max_length or "\x00" in value:
        invalid_query(name, f"must be at most {max_length} characters, without NUL")
    if not value:
        invalid_query(name, "is empty")
    return value


def _uuid(name: str) -> uuid.UUID | None:
    value = _one(name, 36)
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        invalid_query(name, "must be a UUID")


def _moment(name: str) -> dt.datetime | None:
    value = _one(name, 40)
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        invalid_query(name, "must be an ISO 8601 date-time such as 2026-01-31T09:00:00Z")
    if moment.tzinfo is None:
        invalid_query(name, "must carry a time zone (Z or +08:00)")
    try:
        return moment.astimezone(dt.UTC)
    except OverflowError:  # 0001-01-01T00:00+08:00 has no UTC time
        invalid_query(name, "is out of range")


@dataclass(frozen=True)
class Search:
    """The filters of a search, validated."""

    actor: uuid.UUID | None
    actions: tuple[str, ...]
    entity: str | None
    record_id: uuid.UUID | None
    since: dt.datetime | None
    until: dt.datetime | None

    def where(self) -> list[sa.ColumnElement[bool]]:
        clauses: list[sa.ColumnElement[bool]] = []
        if self.actor is not None:
            clauses.append(audit.c.actor_id == self.actor)
        if self.actions:
            matches = []
            for action in self.actions:
                if action.endswith(".*"):
                    # Safe as a LIKE pattern: the grammar admits no '%' and the
                    # only '_' is escaped.
                    prefix = action[:-1].replace("_", "\\_")
                    matches.append(audit.c.action.like(prefix + "%", escape="\\"))
                else:
                    matches.append(audit.c.action == action)
            clauses.append(sa.or_(*matches))
        if self.entity is not None:
            clauses.append(audit.c.entity == self.entity)
        if self.record_id is not None:
            clauses.append(audittrail.about_record(self.record_id))
        if self.since is not None:
            clauses.append(audit.c.at >= self.since)
        if self.until is not None:
            clauses.append(audit.c.at < self.until)
        return clauses

    def describe(self) -> dict[str, Any]:
        """Return the filters as JSON (for the cursor digest and the export's audit entry)."""
        return {
            "actor": None if self.actor is None else str(self.actor),
            "action": list(self.actions),
            "entity": self.entity,
            "record_id": None if self.record_id is None else str(self.record_id),
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
        }


def _search() -> Search:
    actions = request.args.getlist("action")
    if len(actions) > MAX_ACTIONS:
        invalid_query("action", f"is given more than {MAX_ACTIONS} times")
    for action in actions:
        if len(action) > audittrail.MAX_ACTION + 2 or not _ACTION_PATTERN.match(action):
            invalid_query(
                "action", "must be an action such as record.update, or a prefix such as record.*"
            )
    entity = _one("entity", 63)
    if entity is not None and not _ENTITY_PATTERN.match(entity):
        invalid_query("entity", "must be an entity's API name")
    since, until = _moment("since"), _moment("until")
    if since is not None and until is not None and since >= until:
        invalid_query("until", "must be later than since")
    return Search(
        _uuid("actor"), tuple(dict.fromkeys(actions)), entity, _uuid("record_id"), since, until
    )


def _context(tenant: str) -> tuple[RequestContext, Callable[[str], frozenset[str]]]:
    """Resolve the caller, refuse them without ``view_audit``, and return what masks views."""
    context = resolve(tenant)
    viewer = viewer_of(context)
    if not viewer.can(CAPABILITY):
        abort(
            403,
            "forbidden",
            "Forbidden",
            "the audit trail needs a role with the view_audit capability",
        )
    return context, viewer.hidden


def _cursor_secret(context: RequestContext) -> bytes:
    key = platform().settings.secret_key.encode()
    return hmac.new(key, b"audit-cursor:" + context.tenant.id.bytes, hashlib.sha256).digest()


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def view(
    row: Mapping[str, Any],
    hidden: Callable[[str], frozenset[str]],
    record_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """Return an entry as the viewer may see it (hidden fields left out of ``changes``).

    A grouped entry (the records of an import batch) shows ``changes`` keyed by
    record id, whichever form it is stored in (:func:`audittrail.group_members`),
    each record's fields masked alike; asked for one ``record_id``, it shows that
    record's part only.
    """
    if audittrail.is_grouped(row) and isinstance(row["changes"], dict):
        group = audittrail.group_members(row["changes"])
        if record_id is not None:
            group = {k: v for k, v in group.items() if k == str(record_id)}
        changes = {
            key: visible_changes(row["entity"], values, hidden) for key, values in group.items()
        }
    else:
        changes = visible_changes(row["entity"], row["changes"], hidden)
    return {
        "seq": row["seq"],
        "id": str(row["id"]),
        "at": _iso(row["at"]),
        "actor_id": None if row["actor_id"] is None else str(row["actor_id"]),
        "actor_name": row["actor_name"],
        "action": row["action"],
        "entity": row["entity"],
        "record_id": None if row["record_id"] is None else str(row["record_id"]),
        "changes": changes,
        "detail": row["detail"],
        "ip": row["ip"],
        "prev_hash": row["prev_hash"],
        "hash": row["hash"],
    }


@bp.get("")
def search(tenant: str) -> Response:
    """List audit entries, newest first, filtered and a page at a time."""
    context, hidden = _context(tenant)
    _only(LIST_PARAMETERS)
    wanted = _search()
    limit_text = _one("limit", 6)
    limit = DEFAULT_LIMIT
    if limit_text is not None:
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
            invalid_query("limit", f"must be a whole number from 1 to {MAX_LIMIT}")
        limit = int(limit_text)
    digest = cursors.digest(json.dumps(wanted.describe(), sort_keys=True))
    query = sa.select(audit).where(*wanted.where()).order_by(audit.c.seq.desc()).limit(limit + 1)
    token = _one("cursor", cursors.MAX_TOKEN_LENGTH)
    if token is not None:
        try:
            position = cursors.decode(token, _cursor_secret(context))
        except cursors.CursorError as exc:
            invalid_query("cursor", str(exc))
        if (
            position.entity != "_audit"
            or position.digest != digest
            or not cursors.same_shape(position.values, (int,))
            or position.values[0] is None
        ):
            invalid_query("cursor", "belongs to another search; start again without it")
        query = query.where(audit.c.seq < position.values[0])
    with context.store.connect() as connection:
        rows = connection.execute(query).mappings().all()
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = None
    if more:
        next_cursor = cursors.encode(
            cursors.Position("_audit", "-seq", digest, (rows[-1]["seq"],)),
            _cursor_secret(context),
        )
    items = [view(r, hidden, wanted.record_id) for r in rows]
    return jsonify({"items": items, "next_cursor": next_cursor})


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return _iso(value)
    if isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    else:
        text = str(value)
    return spreadsheet.defuse(text)


def csv_rows(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    """Yield CSV text: a header line, then one line per entry (as :func:`view` shows it)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    yield buffer.getvalue()
    for entry in rows:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow([_cell(entry[c]) for c in CSV_COLUMNS])
        yield buffer.getvalue()


def entries(
    connection: sa.Connection, wanted: Search, through: int, batch: int = EXPORT_BATCH
) -> Iterator[Mapping[str, Any]]:
    """Yield matching entries up to ``seq`` ``through``, oldest first, a batch at a time."""
    after = 0
    while True:
        rows = (
            connection.execute(
                sa.select(audit)
                .where(*wanted.where(), audit.c.seq > after, audit.c.seq <= through)
                .order_by(audit.c.seq)
                .limit(batch)
            )
            .mappings()
            .all()
        )
        yield from rows
        if len(rows) < batch:
            return
        after = rows[-1]["seq"]


@bp.get("/export")
def export(tenant: str) -> Response:
    """Stream the matching entries as CSV, oldest first; the export is audited first.

    The export covers the log as it stood when it began: entries appended while
    it streams (its own audit entry included) are not in it.
    """
    context, hidden = _context(tenant)
    _only(EXPORT_PARAMETERS)
    wanted = _search()
    kind = _one("format", 10) or "csv"
    if kind != "csv":
        invalid_query("format", "must be csv")
    principal = context.principal
    with context.store.begin() as connection:
        entry = audittrail.append(
            connection,
            action="audit.export",
            actor_id=principal.user.id,
            actor_name=principal.user.email,
            detail={"format": kind, "filters": wanted.describe()},
            ip=request.remote_addr,
        )
    through = entry["seq"] - 1
    store = context.store

    def generate() -> Iterator[str]:
        with store.connect() as connection:
            yield from csv_rows(
                view(r, hidden, wanted.record_id) for r in entries(connection, wanted, through)
            )

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    filename = f"audit-{context.tenant.slug}-{stamp}.csv"
    return Response(
        stream_with_context(generate()),
        mimetype="text/csv",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )
