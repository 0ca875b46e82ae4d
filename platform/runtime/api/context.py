"""Resolve the tenant from the URL and the caller from the bearer token or login cookie.

The tenant comes only from the URL path, and the token must belong to that
tenant: a token of tenant A on tenant B's path is answered exactly like an
unknown tenant (404), so nothing tells an outsider which tenants exist.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app, g, request

from metacrm.runtime import authz, sessions
from metacrm.runtime.api.problem import abort
from metacrm.runtime.control import Tenant
from metacrm.runtime.model import TenantModel
from metacrm.runtime.platform import Platform
from metacrm.runtime.principal import Principal
from metacrm.runtime.store import TenantStore
from metacrm.runtime.tokens import record_use


@dataclass(frozen=True)
class RequestContext:
    """The tenant a request is for, its store, and who makes it."""

    tenant: Tenant
    store: TenantStore
    principal: Principal


def platform() -> Platform:
    """Return the application's platform object."""
    return current_app.extensions["metacrm"]


def bearer_token() -> str | None:
    """Return the token of an ``Authorization: Bearer`` header, or None without one."""
    # From the WSGI environ: what ``request.headers`` reads, without its lookups.
    header = request.environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def resolve(slug: str) -> RequestContext:
    """Return the request's context, or answer 401/404 problems."""
    cached = g.get("metacrm_context")
    if cached is not None:
        return cached
    presented = bearer_token()
    if presented is None:
        return _resolve_login(slug)
    p: Platform = current_app.extensions["metacrm"]
    found = p.tokens.authenticate(p.control_engine, p.control_mark, presented)
    if found is None:
        abort(
            401,
            "unauthorized",
            "Authentication required",
            "the API token is unknown, expired or revoked",
        )
    principal, tenant = found
    if tenant.slug != slug:
        # A valid token on another tenant's path looks exactly like an unknown tenant.
        abort(404, "not_found", "Not Found", "there is no such tenant")
    _check_ip(sessions.tenant_security(p, tenant))
    if principal.token is not None:
        record_use(p.control_engine, principal.token)
    # Kept on the principal like its access: the token cache gives the same principal
    # and tenant rows until the control database changes, so the store stays the same.
    context = principal.memo.get("context")
    if context is None:
        context = principal.memo["context"] = RequestContext(tenant, p.store(tenant), principal)
    g.metacrm_context = context
    return context


def _check_ip(security: sessions.Security) -> None:
    """Refuse a request from outside the tenant's IP allowlist (tokens and sessions alike)."""
    if not security.allows(request.remote_addr):
        abort(
            403,
            "ip_not_allowed",
            "Address not allowed",
            "this tenant accepts requests only from the networks on its IP allowlist",
        )


def _resolve_login(slug: str) -> RequestContext:
    """Resolve a request that came with the login cookie instead of a bearer token.

    Only a session at its last stage counts (password, second factor, tenant
    chosen); its tenant is the one chosen at sign-in, so the same cookie on
    another tenant's path is a 404. State-changing calls were already checked
    for the page's CSRF token (``web.auth``), because a cookie rides along on
    forged requests too.
    """
    from metacrm.runtime.web.auth import current_login  # the web layer sits on top of this one

    login = current_login()
    if login is None or login.stage != "ready" or login.membership is None:
        abort(
            401,
            "unauthorized",
            "Authentication required",
            "send an API token as 'Authorization: Bearer <token>', or sign in",
        )
    assert login.tenant is not None
    if login.tenant.slug != slug:
        abort(404, "not_found", "Not Found", "there is no such tenant")
    _check_ip(login.security)
    principal = Principal(login.user, login.membership, session_id=login.row.id)
    context = RequestContext(login.tenant, platform().store(login.tenant), principal)
    g.metacrm_context = context
    return context


def access(context: RequestContext, model: TenantModel) -> authz.Access:
    """Return what the request's caller may do under the tenant's current model.

    Built once per principal and model and kept on the principal
    (``Principal.memo``): a login session's lives for its request, a token's for
    as long as the token cache holds its rows. Every check of a request, from
    the 403 to the WHERE clause, asks this one; a newer version builds it again.
    """
    principal = context.principal
    known = principal.memo.get("access")
    if known is not None and known[0] is model:
        return known[1]
    found = authz.for_principal(principal, model, platform().control_engine)
    principal.memo["access"] = (model, found)
    return found
