"""Request rate limits (flask-limiter): one budget for the API, one for sign-in posts.

The API budget (``api_rate_limit``) is shared by every API route and counted
per client address; sign-in posts (``login_rate_limit``) are counted per
address and route. Counters live in Redis when ``redis_url`` is set, so
every gunicorn worker shares them; the embedded default keeps them in process
memory. A refusal is a 429 ``too_many_requests`` problem with ``Retry-After``.
"""

from __future__ import annotations

from flask import Flask, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

#: Endpoints whose POSTs count against the sign-in budget.
LOGIN_ENDPOINTS = frozenset(
    {
        "signin.login",
        "signin.login_mfa",
        # Password guesses and link guesses elsewhere: the operator console, account links.
        "operator.login",
        "account.forgot",
        "account.invitation",
        "account.reset",
    }
)


def _is_api() -> bool:
    parts = request.path.split("/", 5)
    # /t/<tenant>/api/...
    return len(parts) > 3 and parts[1] == "t" and parts[3] == "api"


def _not_login_post() -> bool:
    return request.method != "POST" or request.endpoint not in LOGIN_ENDPOINTS


def init_app(app: Flask) -> Limiter:
    """Install the limiter on the application (one per application, never shared)."""
    settings = app.config["METACRM_SETTINGS"]
    limiter = Limiter(
        get_remote_address,
        app=app,
        storage_uri=settings.redis_url or "memory://",
        application_limits=[settings.api_rate_limit],
        application_limits_exempt_when=lambda: not _is_api(),
        default_limits=[settings.login_rate_limit],
        default_limits_exempt_when=_not_login_post,
        headers_enabled=True,
        key_prefix="metacrm",
        strategy="moving-window",
    )
    app.extensions["metacrm.limiter"] = limiter
    return limiter
