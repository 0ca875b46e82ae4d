"""The caller's own API tokens: list, create (the secret is shown once), revoke.

A member manages only their own tokens in the URL's tenant; another member's
or another tenant's token is a 404. A token can never mint a broader one: a
read-only token may not create tokens at all, and a token limited to some
entities or to an expiry date only creates tokens within those limits.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Blueprint, Response, jsonify

from metacrm.runtime import accounts, tokens
from metacrm.runtime.api.context import RequestContext, platform, resolve
from metacrm.runtime.api.problem import abort, read_json
from metacrm.runtime.control import User

bp = Blueprint("tokens_api", __name__, url_prefix="/t/<tenant>/api/v1/tokens")

MAX_BODY = 16 * 1024
FIELDS = {"name", "read_only", "entities", "expires_days"}


def _writer(tenant: str) -> RequestContext:
    context = resolve(tenant)
    if context.principal.read_only:
        abort(403, "forbidden", "Forbidden", "this API token is read-only")
    return context


@bp.get("")
def list_own_tokens(tenant: str) -> Response:
    """List the caller's tokens in this tenant (never their secrets)."""
    context = resolve(tenant)
    principal = context.principal
    with platform().session() as session:
        items = tokens.list_tokens(session, context.tenant.id, principal.user.id)
        return jsonify({"items": [tokens.describe(t) for t in items]})


def _invalid(errors: list[tuple[str, str]]) -> None:
    abort(
        422,
        "invalid_token_request",
        "The token was not created",
        "; ".join(f"{field}: {message}" for field, message in errors),
        errors=[{"pointer": f"/{field}", "message": message} for field, message in errors],
    )


@bp.post("")
def create_own_token(tenant: str) -> tuple[Response, int]:
    """Create a token for the caller; the answer holds its secret, shown this once."""
    context = _writer(tenant)
    body = read_json(MAX_BODY)
    if not isinstance(body, dict):
        abort(400, "bad_request", "Bad Request", "the body must be a JSON object")
    errors: list[tuple[str, str]] = [(name, "unknown field") for name in sorted(set(body) - FIELDS)]
    name = body.get("name")
    read_only = body.get("read_only", False)
    entities = body.get("entities")
    days = body.get("expires_days")
    if not isinstance(read_only, bool):
        errors.append(("read_only", "must be true or false"))
    if entities is not None and not isinstance(entities, list):
        errors.append(("entities", "must be a list of entity names or null"))
        entities = None
    if days is not None and (isinstance(days, bool) or not isinstance(days, int)):
        errors.append(("expires_days", "must be a whole number of days or null"))
        days = None
    caller = context.principal.token
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=days) if days and days > 0 else None
    if caller is not None:
        if caller.entities is not None and (
            entities is None or not set(entities) <= set(caller.entities)
        ):
            errors.append(("entities", "a token limited to some entities creates only such tokens"))
        if caller.expires_at is not None and (expires is None or expires > caller.expires_at):
            errors.append(("expires_days", "a token cannot create one that outlives it"))
    with context.store.connect() as connection:
        from metacrm.runtime import metastore

        known = accounts.entity_names(metastore.current(connection).bundle)
    text = name if isinstance(name, str) else ""
    errors += [(p.field, str(p)) for p in tokens.scope_problems(text, entities, days, known)]
    if errors:
        _invalid(errors)
    actor = accounts.Actor(context.principal.user.id, context.principal.user.email)
    with accounts.work(platform(), context.tenant, actor) as w:
        user = w.session.get_one(User, context.principal.user.id)
        token, secret = tokens.create_token(
            w.session, w.tenant, user, name, read_only, expires, entities
        )
        accounts.audit_token(w, "token.created", token, user)
        result: dict[str, Any] = {**tokens.describe(token), "token": secret}
    return jsonify(result), 201


@bp.delete("/<token_id>")
def revoke_own_token(tenant: str, token_id: str) -> Response:
    """Revoke one of the caller's tokens at once (the one in use included)."""
    context = _writer(tenant)
    principal = context.principal
    actor = accounts.Actor(principal.user.id, principal.user.email)
    with accounts.work(platform(), context.tenant, actor) as w:
        token = tokens.find_token(w.session, w.tenant.id, token_id, principal.user.id)
        if token is None:
            abort(404, "not_found", "Not Found", "you have no such token in this tenant")
        if tokens.revoke_token(token):
            accounts.audit_token(w, "token.revoked", token, w.session.get_one(User, token.user_id))
    return Response(status=204)
