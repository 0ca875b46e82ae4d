"""The notifications API: the caller's own in-app notifications, and marking them read.

A member only ever reaches notifications addressed to them or to a capability
their roles hold; any other id answers exactly like an unknown one (404), so
nobody learns what others were told.
"""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, Response, jsonify, request

from metacrm.runtime import notifications as inbox
from metacrm.runtime.api.context import RequestContext, platform, resolve
from metacrm.runtime.api.problem import abort, invalid_query, read_json
from metacrm.runtime.api.viewer import viewer_of

bp = Blueprint("notifications_api", __name__, url_prefix="/t/<tenant>/api/v1/notifications")

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_IDS = 500
MAX_BODY = 64 * 1024


def _caller(tenant: str, change: bool = False) -> tuple[RequestContext, frozenset[str]]:
    """Resolve the caller and the capabilities whose notifications they receive."""
    context = resolve(tenant)
    if change and context.principal.read_only:
        abort(403, "forbidden", "Forbidden", "this API token is read-only")
    return context, viewer_of(context).audience


def _one(name: str, max_length: int) -> str | None:
    values = request.args.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        invalid_query(name, "is given more than once")
    if len(values[0]) > max_length or not values[0]:
        invalid_query(name, f"must be 1 to {max_length} characters")
    return values[0]


@bp.get("")
def listing(tenant: str) -> Response:
    """List the caller's notifications, newest first, with the unread count."""
    context, held = _caller(tenant)
    known = ("unread", "limit", "before")
    for name in request.args:
        if name not in known:
            invalid_query(
                name[:40].replace("~", "~0").replace("/", "~1"),
                "is not a parameter here (known: " + ", ".join(known) + ")",
            )
    unread = _one("unread", 5)
    if unread not in (None, "true", "false"):
        invalid_query("unread", "must be true or false")
    limit_text = _one("limit", 4)
    limit = DEFAULT_LIMIT
    if limit_text is not None:
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
            invalid_query("limit", f"must be a whole number from 1 to {MAX_LIMIT}")
        limit = int(limit_text)
    before_text = _one("before", 36)
    before = None
    if before_text is not None:
        try:
            before = uuid.UUID(before_text)
        except ValueError:
            invalid_query("before", "must be the id of a notification")
    user_id = context.principal.user.id
    with context.store.connect() as connection:
        items = inbox.inbox(
            connection,
            user_id,
            held,
            unread_only=unread == "true",
            before=before,
            limit=limit + 1,
        )
        count = inbox.unread_count(connection, user_id, held)
    more = len(items) > limit
    items = items[:limit]
    return jsonify(
        {
            "items": [n.to_json() for n in items],
            "unread": count,
            "next_before": str(items[-1].id) if more else None,
        }
    )


def _ids(body: Any) -> list[uuid.UUID] | None:
    if not isinstance(body, dict) or set(body) - {"ids", "all"} or not body:
        abort(
            400,
            "bad_request",
            "Bad Request",
            'send {"ids": [notification ids]} or {"all": true}',
        )
    if "all" in body:
        if body["all"] is not True or "ids" in body:
            abort(
                422,
                "validation_failed",
                "Invalid request",
                "'all' must be true and comes without 'ids'",
                errors=[{"pointer": "/all", "message": "must be true, without ids"}],
            )
        return None
    ids = body["ids"]
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_IDS:
        abort(
            422,
            "validation_failed",
            "Invalid request",
            f"'ids' must be a list of 1 to {MAX_IDS} notification ids",
            errors=[{"pointer": "/ids", "message": f"must list 1 to {MAX_IDS} ids"}],
        )
    parsed: list[uuid.UUID] = []
    errors = []
    for i, value in enumerate(ids):
        try:
            if not isinstance(value, str) or len(value) > 36:
                raise ValueError
            parsed.append(uuid.UUID(value))
        except ValueError:
            errors.append({"pointer": f"/ids/{i}", "message": "is not a notification id"})
    if errors:
        abort(422, "validation_failed", "Invalid request", errors[0]["message"], errors=errors)
    return parsed


@bp.post("/read")
def mark_read(tenant: str) -> Response:
    """Mark some (``ids``) or all (``all: true``) of the caller's notifications read."""
    context, held = _caller(tenant, change=True)
    ids = _ids(read_json(min(platform().settings.max_request_bytes, MAX_BODY)))
    with context.store.begin() as connection:
        marked = inbox.mark_read(connection, context.principal.user.id, held, ids)
        count = inbox.unread_count(connection, context.principal.user.id, held)
    return jsonify({"marked": marked, "unread": count})


@bp.post("/<notification_id>/read")
def mark_one_read(tenant: str, notification_id: str) -> Response:
    """Mark one notification read; 404 when it is not the caller's."""
    context, held = _caller(tenant, change=True)
    try:
        wanted = uuid.UUID(notification_id) if len(notification_id) <= 36 else None
    except ValueError:
        wanted = None
    user_id = context.principal.user.id
    with context.store.begin() as connection:
        if wanted is None or not inbox.addressed_to(connection, wanted, user_id, held):
            abort(404, "not_found", "Not Found", "there is no such notification")
        inbox.mark_read(connection, user_id, held, [wanted])
    return Response(status=204)
