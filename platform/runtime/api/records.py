"""The record API: ``/t/<tenant>/api/v1/records/<entity>``.

Views are thin: they parse the request strictly, run the record service
(``metacrm.runtime.records``) or the query module, and answer JSON or an RFC
9457 problem. A write is one transaction holding the change, its audit entry,
its outbox event and, with an ``Idempotency-Key``, its stored answer: all of
them are committed or none.

Choices a client can rely on (the OpenAPI document says the same):

- an id that is not a UUID names no record: ``404 not_found``;
- ``ETag`` is the strong tag ``"<version>"``; ``If-Match`` takes such tags or ``*``;
- bulk requests take 1 to 500 items, all or nothing, and their errors point
  into the body (``/items/3/name``, ``/items/3/fields/name`` for bulk updates);
- unknown query parameters are refused, so a misspelt ``fitler=`` never lists everything.

Problem codes: ``bad_request``, ``malformed_json``, ``invalid_query`` (with the query
module's code as ``query_code``), ``invalid_if_match``, ``invalid_idempotency_key``
(400); ``unauthorized`` (401); ``forbidden`` (403: the caller's roles or token do not
allow the action on the entity at all); ``not_found`` (404, also for a record outside the
caller's scope); ``not_in_recycle_bin``, ``still_referenced`` (409); ``version_mismatch`` (412,
with ``current_version``); ``payload_too_large`` (413); ``unsupported_media_type``
(415); ``validation_failed``, ``idempotency_key_reused`` (422);
``precondition_required`` (428); ``busy`` (503, with Retry-After).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import sqlalchemy as sa
from flask import Blueprint, Response, jsonify, request, url_for
from sqlalchemy.engine import Connection

from metacrm.metadata.expression import EvalContext
from metacrm.runtime import authz, query, records
from metacrm.runtime.api import idempotency
from metacrm.runtime.api.context import RequestContext, access, platform, resolve
from metacrm.runtime.api.problem import ProblemError, abort, invalid_query, pointer_token, read_json
from metacrm.runtime.model import EntityModel, TenantModel
from metacrm.runtime.records import Caller

bp = Blueprint("records", __name__, url_prefix="/t/<tenant>/api/v1/records")

MAX_BULK_ITEMS = 500
DEFAULT_LIMIT = query.DEFAULT_LIMIT
MAX_LIMIT = query.MAX_LIMIT
#: Above this many matches ``/count`` answers an estimate unless ``exact=true``.
COUNT_THRESHOLD = 1000
_ENTITY = re.compile(r"[a-z][a-z0-9_]{0,62}", re.ASCII)
_UUID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII
)
_LIMIT = re.compile(r"[0-9]{1,9}", re.ASCII)
_ENTITY_TAG = re.compile(r'\s*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*(?:,|$)')
_VERSION = re.compile(r"[1-9][0-9]{0,17}", re.ASCII)
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOOLEANS = {"true": True, "false": False}
#: PostgreSQL errors a retry can cure: deadlock, serialization failure, lock not available.
_TRANSIENT_SQLSTATES = ("40P01", "40001", "55P03")


# -- request parsing ------------------------------------------------------------------------


def _context(tenant: str, write: bool = False, parameters: Sequence[str] = ()) -> RequestContext:
    """Authenticate first, so nothing about a request is answered to a stranger.

    A write takes no query parameters but ``parameters``.
    """
    context = resolve(tenant)
    if write:
        if context.principal.read_only:
            abort(403, "forbidden", "Forbidden", "this API token is read-only")
        _only(*parameters)
    return context


def _entity(model: TenantModel, name: str) -> EntityModel:
    entity = model.entity(name) if _ENTITY.fullmatch(name) else None
    if entity is None:
        abort(404, "not_found", "Not Found", f"there is no entity {name[:63]!r}")
    return entity


def _record_id(value: str) -> uuid.UUID:
    if not _UUID.fullmatch(value):
        abort(
            404,
            "not_found",
            "Not Found",
            f"{value[:40]!r} is not a record id: ids are UUIDs such as "
            "0190f5d2-7c1e-7a2b-9c3d-4e5f60718293",
        )
    return uuid.UUID(value)


def _caller(context: RequestContext, allowed: authz.Access) -> Caller:
    principal = context.principal
    return Caller(principal.user.id, principal.user.email, principal.membership.team_id, allowed)


def _forbidden(exc: authz.Forbidden) -> NoReturn:
    abort(403, "forbidden", "Forbidden", str(exc))


def _allowed(context: RequestContext, model: TenantModel, entity: str, action: str) -> authz.Access:
    """Return the caller's access after checking that ``action`` on ``entity`` is allowed at all."""
    found = access(context, model)
    try:
        found.require(entity, action)
    except authz.Forbidden as exc:
        _forbidden(exc)
    return found


class _RequestEvalContext(EvalContext):
    """The request's evaluation context, reading the clock only if an expression asks.

    Most requests run statements built once per published version, which hold no
    ``now()`` or ``today()``: working out today's date in the tenant's time zone
    and checking the values was 2 % of a worker's time under load on a read by
    id. ``now`` and ``today`` are therefore set on first use (``__getattr__`` is
    only asked for attributes not set yet); the other values are set at once.
    """

    _timezone: dt.tzinfo

    def __init__(
        self, timezone: dt.tzinfo, user_id: uuid.UUID, team_ids: Sequence[uuid.UUID]
    ) -> None:
        object.__setattr__(self, "_timezone", timezone)
        object.__setattr__(self, "user_id", user_id)
        object.__setattr__(self, "team_ids", team_ids)

    def __getattr__(self, name: str) -> Any:
        if name not in ("now", "today"):
            raise AttributeError(name)
        now = dt.datetime.now(dt.UTC)
        object.__setattr__(self, "now", now)
        object.__setattr__(self, "today", now.astimezone(self._timezone).date())
        return object.__getattribute__(self, name)


def _eval_context(
    model: TenantModel, context: RequestContext, allowed: authz.Access
) -> EvalContext:
    return _RequestEvalContext(model.timezone, context.principal.user.id, allowed.teams)


def _cursor_secret(context: RequestContext) -> bytes:
    """Sign cursors per tenant, so one tenant's cursor is refused by every other."""
    key = platform().settings.secret_key.encode()
    return hmac.new(key, b"records-cursor:" + context.tenant.id.bytes, hashlib.sha256).digest()


LIST_PARAMETERS = ("filter", "sort", "fields", "limit", "cursor", "q", "include")


def _only(*names: str) -> None:
    """Refuse query parameters the endpoint does not know: a typo must not widen a list."""
    if not request.query_string:
        return  # the common case of a read by id: nothing to parse
    for name in request.args:
        if name not in names:
            known = ", ".join(names) if names else "none"
            invalid_query(name[:40], f"is not a parameter here (known: {known})")


def _param(name: str) -> str | None:
    """Return one query parameter, refusing repeats and NUL characters."""
    if not request.query_string:
        return None
    values = request.args.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        invalid_query(name, "is given more than once")
    if "\x00" in values[0]:
        invalid_query(name, "must not contain the NUL character")
    return values[0]


def _flag(name: str) -> bool:
    raw = _param(name)
    if raw is None:
        return False
    if raw not in _BOOLEANS:
        invalid_query(name, "must be true or false")
    return _BOOLEANS[raw]


def _limit() -> int:
    raw = _param("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not _LIMIT.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        invalid_query("limit", f"must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def _names(name: str) -> list[str] | None:
    raw = _param(name)
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",")]


def _check_values(value: Any) -> None:
    """Refuse strings with NUL or lone surrogates and numbers that overflowed to infinity.

    The strict decoder lets them through, but no database stores them: they would
    fail deep inside a write instead of being answered here.
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, pointer = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                _invalid(
                    [{"pointer": pointer, "message": "must not contain the NUL character"}],
                )
            if _SURROGATE.search(item):
                abort(
                    400,
                    "malformed_json",
                    "The body is not acceptable JSON",
                    f"the string at '{pointer}' holds a lone UTF-16 surrogate",
                )
        elif isinstance(item, float) and not math.isfinite(item):
            abort(
                400,
                "malformed_json",
                "The body is not acceptable JSON",
                f"the number at '{pointer}' is too large",
            )
        elif isinstance(item, dict):
            for key, child in item.items():
                stack.append((key, f"{pointer}/{pointer_token(key)}"))
                stack.append((child, f"{pointer}/{pointer_token(key)}"))
        elif isinstance(item, list):
            stack.extend((child, f"{pointer}/{index}") for index, child in enumerate(item))


def _body() -> dict[str, Any]:
    """Return the request's JSON object, decoded strictly."""
    try:
        body = read_json(platform().settings.max_request_bytes)
    except ValueError as exc:
        # json refuses integers of more than 4,300 digits with a ValueError of its own.
        abort(400, "malformed_json", "The body is not acceptable JSON", str(exc)[:200])
    if not isinstance(body, dict):
        abort(400, "bad_request", "Bad Request", "the body must be a JSON object")
    _check_values(body)
    return body


def _invalid(errors: list[dict[str, Any]], detail: str | None = None) -> NoReturn:
    abort(
        422,
        "validation_failed",
        "Invalid request",
        detail or f"{len(errors)} problem(s) found; nothing was changed",
        errors=errors,
    )


def _members(body: Mapping[str, Any], allowed: Sequence[str], pointer: str = "") -> None:
    unknown = [name for name in body if name not in allowed]
    if unknown:
        message = f"is not a member; use {', '.join(allowed)}"
        _invalid(
            [
                {"pointer": f"{pointer}/{pointer_token(name)}", "message": message}
                for name in unknown
            ]
        )


def _list_member(body: Mapping[str, Any], name: str) -> list[Any]:
    _members(body, [name])
    items = body.get(name)
    if not isinstance(items, list):
        _invalid([{"pointer": f"/{name}", "message": "must be a list"}])
    if not 1 <= len(items) <= MAX_BULK_ITEMS:
        _invalid(
            [
                {
                    "pointer": f"/{name}",
                    "message": f"has {len(items)} items; send 1 to {MAX_BULK_ITEMS} per request",
                }
            ]
        )
    return items


_DECIMAL_TYPES = ("decimal", "currency", "percent")


# -- preconditions --------------------------------------------------------------------------


@dataclass(frozen=True)
class IfMatch:
    """A parsed ``If-Match``: ``*``, or the versions its strong entity tags name."""

    any: bool
    versions: frozenset[int]


def _if_match() -> IfMatch | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    if raw.strip() == "*":
        return IfMatch(True, frozenset())
    versions: set[int] = set()
    position = 0
    while position < len(raw):
        match = _ENTITY_TAG.match(raw, position)
        if match is None or match.end() == position:
            abort(
                400,
                "invalid_if_match",
                "Invalid If-Match",
                'If-Match must be * or entity tags as the ETag header gives them, e.g. "3"',
            )
        weak, tag = match.groups()
        # If-Match compares strongly: a weak tag never matches (RFC 9110, 13.1.1).
        if not weak and _VERSION.fullmatch(tag):
            versions.add(int(tag))
        position = match.end()
    return IfMatch(False, frozenset(versions))


def _expected_version(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    record_id: uuid.UUID,
    ctx: EvalContext,
    condition: IfMatch | None,
    scope: sa.ColumnElement[bool] | None = None,
) -> int | None:
    """Return the version the write must find, or raise VersionMismatch at once."""
    if condition is None or condition.any:
        return None
    if len(condition.versions) == 1:
        return next(iter(condition.versions))
    current = records.get(connection, model, entity, record_id, ctx, scope=scope)["version"]
    if current not in condition.versions:
        raise records.VersionMismatch(current)
    return current


def _require_if_match(model: TenantModel, condition: IfMatch | None) -> None:
    if not model.settings.get("require_if_match", False):
        return
    if condition is None or condition.any:
        abort(
            428,
            "precondition_required",
            "Precondition Required",
            "this tenant requires If-Match with the record's version (its ETag) on updates",
        )


# -- answers ---------------------------------------------------------------------------------


def _etag(record: Mapping[str, Any]) -> str:
    return f'"{record["version"]}"'


def _record_response(record: Mapping[str, Any]) -> Response:
    response = jsonify(record)
    response.headers.add("ETag", _etag(record))  # a new answer has no ETag to replace
    return response


def _location(tenant: str, entity: str, record_id: str) -> str:
    return url_for(".get_record", tenant=tenant, entity=entity, record_id=record_id)


@contextmanager
def _refusals(pointer: Callable[[str], str] = lambda p: p) -> Iterator[None]:
    """Answer the record service's and the query module's refusals as problems."""
    try:
        yield
    except records.RecordInvalid as exc:
        _invalid([{**e, "pointer": pointer(e["pointer"])} for e in exc.errors])
    except records.RecordNotFound as exc:
        abort(404, "not_found", "Not Found", str(exc))
    except authz.Forbidden as exc:
        _forbidden(exc)
    except records.VersionMismatch as exc:
        abort(
            412,
            "version_mismatch",
            "The record changed meanwhile",
            f"the record is at version {exc.current}; read it again and retry",
            current_version=exc.current,
        )
    except query.QueryError as exc:
        error: dict[str, Any] = {"pointer": exc.pointer or "", "message": exc.message}
        if exc.line is not None:
            error.update(line=exc.line, column=exc.column)
        where = (exc.pointer or "").lstrip("/")
        abort(
            400,
            "invalid_query",
            "Invalid query",
            f"{where}: {exc.message}" if where else exc.message,
            query_code=exc.code,
            errors=[error],
        )


@dataclass
class Read:
    """What a read needs: a connection, the model, the entity and the evaluation context.

    ``model`` and ``entity`` are as the caller sees them (fields hidden from it taken
    out); ``scope`` is the caller's row condition for the request's action, which
    every statement of the request puts in its WHERE clause.
    """

    context: RequestContext
    connection: Connection
    model: TenantModel
    entity: EntityModel
    ctx: EvalContext
    access: authz.Access
    scope: sa.ColumnElement[bool] | None


@contextmanager
def _reading(
    tenant: str, entity_name: str, action: str = "read", transaction: bool = False
) -> Iterator[Read]:
    """Yield what a read needs; ``transaction`` when it needs one (a savepoint, a local setting).

    Without it the statements run on ``TenantStore.read``: no BEGIN/ROLLBACK round trips.
    """
    context = _context(tenant)
    connect = context.store.connect if transaction else context.store.read
    with connect() as connection, _refusals():
        model = platform().models.current(context.store, connection)
        entity = _entity(model, entity_name)
        allowed = _allowed(context, model, entity.name, action)
        view = allowed.view(model)
        shown = view.entities[entity.name]
        yield Read(
            context,
            connection,
            view,
            shown,
            _eval_context(model, context, allowed),
            allowed,
            allowed.where(shown, action),
        )


@dataclass
class Write(Read):
    """What a write needs besides a read's: who writes."""

    caller: Caller


Answer = tuple[int, Any, dict[str, str]]


def _write(
    tenant: str,
    entity_name: str,
    action: Callable[[Write], Answer],
    pointer: Callable[[str], str] = lambda p: p,
    replayable: bool = False,
    permission: str = "update",
    parameters: Sequence[str] = (),
) -> Response:
    """Run one write in one transaction, with Idempotency-Key when ``replayable``.

    ``permission`` is the action the caller needs on the entity: refused with 403
    before anything is written; its scope is the WHERE condition of the write.
    """
    context = _context(tenant, write=True, parameters=parameters)
    key = idempotency.requested_key() if replayable else None
    try:
        with context.store.begin(immediate=True) as begun:
            # Any error below rolls the whole transaction back: no savepoints needed.
            connection = records.whole_transaction(begun)
            model = platform().models.current(context.store, connection)
            entity = _entity(model, entity_name)
            allowed = _allowed(context, model, entity.name, permission)
            scope = allowed.where(entity, permission)
            ctx = _eval_context(model, context, allowed)
            claim = None
            if key is not None:
                claimed = idempotency.claim(connection, context.principal.user.id, key, ctx.now)
                if isinstance(claimed, Response):
                    return claimed
                claim = claimed
            with _refusals(pointer):
                status, body, headers = action(
                    Write(
                        context,
                        connection,
                        model,
                        entity,
                        ctx,
                        allowed,
                        scope,
                        _caller(context, allowed),
                    )
                )
            if claim is not None:
                idempotency.remember(connection, claim, status, body, headers)
    except sa.exc.OperationalError as exc:
        if not _transient(exc):
            raise
        return _busy()
    if status == 204:
        return Response(status=204, headers=headers)
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers)
    return response


def _transient(exc: sa.exc.OperationalError) -> bool:
    """Tell whether a database error is one a retry can cure (the transaction rolled back)."""
    message = str(exc.orig).lower()
    if "database is locked" in message or "database table is locked" in message:
        return True
    return getattr(exc.orig, "sqlstate", None) in _TRANSIENT_SQLSTATES


def _busy() -> Response:
    response = ProblemError(
        503, "busy", "Busy", "the records are busy with other changes; nothing was changed, retry"
    ).response()
    response.headers["Retry-After"] = "1"
    return response


def _item_pointer(inner: str = "") -> Callable[[str], str]:
    """Map the service's bulk pointers (``/3/name``) into the request body."""

    def pointer(value: str) -> str:
        index, _, rest = value.lstrip("/").partition("/")
        if not index.isdigit():
            return value
        return f"/items/{index}{inner}/{rest}" if rest else f"/items/{index}"

    return pointer


# -- reading ---------------------------------------------------------------------------------


def _list_request(deleted_allowed: bool = True) -> query.ListRequest:
    if deleted_allowed:
        _only(*LIST_PARAMETERS, "deleted")
    else:
        _only(*LIST_PARAMETERS)
    fields = _names("fields")
    return query.ListRequest(
        filter=_param("filter"),
        sort=_param("sort"),
        fields=None if fields is None else tuple(fields),
        limit=_limit(),
        cursor=_param("cursor"),
        q=_param("q"),
        include=tuple(_names("include") or ()),
        deleted=_flag("deleted") if deleted_allowed else False,
    )


def _page_body(page: query.Page) -> dict[str, Any]:
    return {"items": page.items, "next_cursor": page.next_cursor}


@bp.get("/<entity>")
def list_records(tenant: str, entity: str) -> Response:
    """List records: filter, sort, fields, keyset pages, search, include; or the bin."""
    _context(tenant)
    list_request = _list_request()
    with _reading(tenant, entity) as r:
        page = query.list_records(
            r.connection,
            r.model,
            r.entity,
            list_request,
            r.ctx,
            _cursor_secret(r.context),
            r.scope,
            embed_scope=r.access.scope_of,
        )
    return jsonify(_page_body(page))


@bp.get("/<entity>/count")
def count_records(tenant: str, entity: str) -> Response:
    """Count the records a filter matches: exact up to a threshold, then an estimate."""
    _context(tenant)
    _only("filter", "q", "deleted", "exact")
    expression = _param("filter")
    search = _param("q")
    exact = _flag("exact")
    deleted = _flag("deleted")
    # Only an exact count sets a statement timeout, which needs a transaction of its own.
    with _reading(tenant, entity, transaction=exact) as r:
        count, is_exact = query.count_records(
            r.connection,
            r.model,
            r.entity,
            expression,
            r.ctx,
            exact=exact,
            threshold=COUNT_THRESHOLD,
            q=search,
            deleted=deleted,
            scope=r.scope,
        )
    return jsonify({"count": count, "exact": is_exact})


@bp.get("/<entity>/<record_id>")
def get_record(tenant: str, entity: str, record_id: str) -> Response:
    """Return one record (from the recycle bin with deleted=true), with its ETag."""
    _context(tenant)
    key = _record_id(record_id)
    _only("deleted")
    deleted = _flag("deleted")
    with _reading(tenant, entity) as r:
        record = records.get(
            r.connection, r.model, r.entity, key, r.ctx, deleted=deleted, scope=r.scope
        )
    return _record_response(record)


@bp.get("/<entity>/<record_id>/related/<other>")
def related_records(tenant: str, entity: str, record_id: str, other: str) -> Response:
    """List the records of ``other`` whose lookups or related-to fields point at this record."""
    _context(tenant)
    key = _record_id(record_id)
    list_request = _list_request(deleted_allowed=False)
    with _reading(tenant, entity) as r:
        via = _entity(r.model, other)
        table = r.entity.table
        found = sa.select(table.c.id).where(table.c.id == key, table.c.deleted_at.is_(None))
        if r.scope is not None:
            found = found.where(r.scope)
        live = r.connection.execute(found).first()
        if live is None:
            abort(404, "not_found", "Not Found", f"no live {r.entity.name} record with id {key}")
        try:
            page = query.related_records(
                r.connection,
                r.model,
                r.entity,
                key,
                via,
                list_request,
                r.ctx,
                _cursor_secret(r.context),
                r.access.where(via, "read"),
                embed_scope=r.access.scope_of,
            )
        except query.QueryError as exc:
            if exc.code != "not_related":
                raise
            abort(404, "not_found", "Not Found", exc.message)
    return jsonify(_page_body(page))


# -- writing ---------------------------------------------------------------------------------


@bp.post("/<entity>")
def create_record(tenant: str, entity: str) -> Response:
    """Create a record: 201 with Location and ETag; Idempotency-Key replays a retry."""
    _context(tenant, write=True)
    body = _body()

    def action(w: Write) -> Answer:
        record = records.create(w.connection, w.model, w.entity, body, w.caller, platform().cipher)
        headers = {
            "Location": _location(tenant, w.entity.name, record["id"]),
            "ETag": _etag(record),
        }
        return 201, record, headers

    return _write(tenant, entity, action, replayable=True, permission="create")


@bp.patch("/<entity>/<record_id>")
def update_record(tenant: str, entity: str, record_id: str) -> Response:
    """Change some fields of a record; If-Match makes the change conditional."""
    _context(tenant, write=True)
    key = _record_id(record_id)
    condition = _if_match()
    body = _body()

    def action(w: Write) -> Answer:
        _require_if_match(w.model, condition)
        expected = _expected_version(
            w.connection, w.model, w.entity, key, w.ctx, condition, w.scope
        )
        record = records.update(
            w.connection,
            w.model,
            w.entity,
            key,
            body,
            w.caller,
            platform().cipher,
            expected,
            scope=w.scope,
        )
        return 200, record, {"ETag": _etag(record)}

    return _write(tenant, entity, action)


@bp.delete("/<entity>/<record_id>")
def delete_record(tenant: str, entity: str, record_id: str) -> Response:
    """Move a record to the recycle bin; If-Match makes the delete conditional."""
    _context(tenant, write=True)
    key = _record_id(record_id)
    condition = _if_match()

    def action(w: Write) -> Answer:
        expected = _expected_version(
            w.connection, w.model, w.entity, key, w.ctx, condition, w.scope
        )
        records.delete_many(
            w.connection, w.model, w.entity, [(key, expected)], w.caller, scope=w.scope
        )
        return 204, None, {}

    return _write(tenant, entity, action, permission="delete")


@bp.post("/<entity>/<record_id>/restore")
def restore_record(tenant: str, entity: str, record_id: str) -> Response:
    """Bring a record back from the recycle bin."""
    _context(tenant, write=True)
    key = _record_id(record_id)

    def action(w: Write) -> Answer:
        record = records.restore(w.connection, w.model, w.entity, key, w.caller, scope=w.scope)
        return 200, record, {"ETag": _etag(record)}

    return _write(tenant, entity, action, replayable=True, permission="delete")


@bp.delete("/<entity>/<record_id>/purge")
def purge_record(tenant: str, entity: str, record_id: str) -> Response:
    """Delete a record from the recycle bin for good."""
    _context(tenant, write=True)
    key = _record_id(record_id)

    def action(w: Write) -> Answer:
        table = w.entity.table
        found = sa.select(table.c.id).where(table.c.id == key, table.c.deleted_at.is_(None))
        if w.scope is not None:
            found = found.where(w.scope)
        live = w.connection.execute(found).first()
        if live is not None:
            abort(
                409,
                "not_in_recycle_bin",
                "The record is not in the recycle bin",
                "delete the record first; only records in the recycle bin can be purged",
            )
        try:
            records.purge(w.connection, w.model, w.entity, key, w.caller, scope=w.scope)
        except records.RecordInvalid as exc:
            abort(
                409,
                "still_referenced",
                "Other records point at this one",
                exc.errors[0]["message"],
            )
        return 204, None, {}

    return _write(tenant, entity, action, permission="delete")


# -- bulk ------------------------------------------------------------------------------------


@bp.post("/<entity>/bulk")
def bulk_create(tenant: str, entity: str) -> Response:
    """Create up to 500 records, all or none; errors point at /items/<i>/<field>."""
    _context(tenant, write=True)
    items = _list_member(_body(), "items")

    def action(w: Write) -> Answer:
        created = records.create_many(
            w.connection, w.model, w.entity, items, w.caller, platform().cipher, bulk=True
        )
        return 201, {"items": created}, {}

    return _write(
        tenant, entity, action, pointer=_item_pointer(), replayable=True, permission="create"
    )


def _bulk_patch_items(items: list[Any]) -> list[tuple[uuid.UUID, dict[str, Any], int | None]]:
    errors: list[dict[str, Any]] = []
    parsed = []
    seen: dict[uuid.UUID, int] = {}
    for index, item in enumerate(items):
        at = f"/items/{index}"
        if not isinstance(item, dict):
            errors.append({"pointer": at, "message": 'must be {"id", "version", "fields"}'})
            continue
        errors.extend(
            {
                "pointer": f"{at}/{pointer_token(name)}",
                "message": "is not a member; use id, version, fields",
            }
            for name in item
            if name not in ("id", "version", "fields")
        )
        raw_id = item.get("id")
        record_id = None
        if not isinstance(raw_id, str) or not _UUID.fullmatch(raw_id):
            errors.append({"pointer": f"{at}/id", "message": "must be a record id (a UUID)"})
        else:
            record_id = uuid.UUID(raw_id)
            if record_id in seen:
                errors.append(
                    {"pointer": f"{at}/id", "message": f"repeats /items/{seen[record_id]}/id"}
                )
            seen.setdefault(record_id, index)
        version = item.get("version")
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 1
        ):
            errors.append({"pointer": f"{at}/version", "message": "must be a whole number >= 1"})
        fields = item.get("fields")
        if not isinstance(fields, dict):
            errors.append({"pointer": f"{at}/fields", "message": "must be an object of fields"})
        if record_id is not None and isinstance(fields, dict):
            parsed.append((record_id, fields, version))
    if errors:
        _invalid(errors)
    return parsed


def _live_versions(w: Write, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int]:
    table = w.entity.table
    statement = sa.select(table.c.id, table.c.version).where(
        table.c.id.in_(ids), table.c.deleted_at.is_(None)
    )
    if w.scope is not None:
        # Records outside the caller's scope are "no live record", exactly like missing ones.
        statement = statement.where(w.scope)
    return {row.id: row.version for row in w.connection.execute(statement)}


@bp.patch("/<entity>/bulk")
def bulk_update(tenant: str, entity: str) -> Response:
    """Change up to 500 records, all or none; items are {id, version?, fields}."""
    _context(tenant, write=True)
    items = _bulk_patch_items(_list_member(_body(), "items"))

    def action(w: Write) -> Answer:
        required = w.model.settings.get("require_if_match", False)
        missing = [
            {"pointer": f"/items/{index}/version", "message": "is required by this tenant"}
            for index, (_, _, version) in enumerate(items)
            if version is None and required
        ]
        if missing:
            abort(
                428,
                "precondition_required",
                "Precondition Required",
                "this tenant requires the version of every record an update changes",
                errors=missing,
            )
        current = _live_versions(w, [record_id for record_id, _, _ in items])
        gone = [
            {"pointer": f"/items/{index}/id", "message": f"no live {w.entity.name} record"}
            for index, (record_id, _, _) in enumerate(items)
            if record_id not in current
        ]
        if gone:
            _invalid(gone)
        stale = [
            {
                "pointer": f"/items/{index}/version",
                "message": f"the record is at version {current[record_id]}",
                "current_version": current[record_id],
            }
            for index, (record_id, _, version) in enumerate(items)
            if version is not None and version != current[record_id]
        ]
        if stale:
            abort(
                412,
                "version_mismatch",
                "Records changed meanwhile",
                f"{len(stale)} record(s) changed since you read them; read them again",
                errors=stale,
            )
        updated = records.update_many(
            w.connection,
            w.model,
            w.entity,
            items,
            w.caller,
            platform().cipher,
            bulk=True,
            scope=w.scope,
        )
        return 200, {"items": updated}, {}

    return _write(tenant, entity, action, pointer=_item_pointer("/fields"))


@bp.post("/<entity>/bulk/delete")
def bulk_delete(tenant: str, entity: str) -> Response:
    """Move up to 500 records to the recycle bin, all or none."""
    _context(tenant, write=True)
    raw = _list_member(_body(), "ids")
    errors = []
    ids: list[uuid.UUID] = []
    seen: dict[uuid.UUID, int] = {}
    for index, value in enumerate(raw):
        if not isinstance(value, str) or not _UUID.fullmatch(value):
            errors.append({"pointer": f"/ids/{index}", "message": "must be a record id (a UUID)"})
            continue
        record_id = uuid.UUID(value)
        if record_id in seen:
            errors.append(
                {"pointer": f"/ids/{index}", "message": f"repeats /ids/{seen[record_id]}"}
            )
            continue
        seen[record_id] = index
        ids.append(record_id)
    if errors:
        _invalid(errors)

    def action(w: Write) -> Answer:
        current = _live_versions(w, ids)
        gone = [
            {"pointer": f"/ids/{seen[record_id]}", "message": f"no live {w.entity.name} record"}
            for record_id in ids
            if record_id not in current
        ]
        if gone:
            _invalid(gone)
        records.delete_many(
            w.connection, w.model, w.entity, [(i, None) for i in ids], w.caller, scope=w.scope
        )
        return 204, None, {}

    return _write(tenant, entity, action, replayable=True, permission="delete")
