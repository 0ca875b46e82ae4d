"""The caller's own API tokens: list, create (the secret is shown once), revoke.

A member manages only their own tokens in the URL's tenant; another member's
or another tenant's token is a 404. A token can never mint a broader one: a
read-only token may not create tokens at all, and a token limited to some
entities or to an expiry date only creates tokens within those limits.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from metacrm.runtime import accounts, tokens
from metacrm.runtime.api.context import RequestContext, platform, resolve
from metacrm.runtime.api.problem import abort, read_json

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
    with context.store.connect() as connection:
        from metacrm.runtime import metastore

        known = accounts.entity_names(metastore.current(connection).bundle)
    text = name if isinstance(name, str) else ""
    problems, expires = tokens.request_problems(
        text, entities, days, known, context.principal.token
    )
    errors += [(p.field, str(p)) for p in problems]
    if errors:
        _invalid(errors)
    actor = accounts.Actor(context.principal.user.id, context.principal.user.email)
    with accounts.work(platform(), context.tenant, actor) as w:
        token, secret = accounts.issue_token(
            w, context.principal.user.id, text, read_only, expires, entities
        )
        result: dict[str, Any] = {**tokens.describe(token), "token": secret}
    return jsonify(result), 201


@bp.delete("/<token_id>")
def revoke_own_token(tenant: str, token_id: str) -> Response:
    """Revoke one of the caller's tokens at once (the one in use included)."""
    context = _writer(tenant)
    principal = context.principal
    actor = accounts.Actor(principal.user.id, principal.user.email)
    with accounts.work(platform(), context.tenant, actor) as w:
        if accounts.revoke_own_token(w, principal.user.id, token_id) is None:
            abort(404, "not_found", "Not Found", "you have no such token in this tenant")
    return Response(status=204)
