"""Request rate limits (flask-limiter): one budget for the API, one for sign-in posts.

The API budget (``api_rate_limit``) is shared by every API route and counted
per client address; sign-in posts (``login_rate_limit``) are counted per
address and route. Counters live in Redis when ``redis_url`` is set, so
every gunicorn worker shares them; the embedded default keeps them in process
memory. A refusal is a 429 ``too_many_requests`` problem with ``Retry-After``.
"""

from __future__ import annotations

from flask import Flask, Response, request
from flask_limiter import HeaderNames, Limiter
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


RETRY_HEADER = "X-RateLimit-Retry-After"


def _retry_after(response: Response) -> Response:
    """Give a refusal the standard Retry-After (and only a refusal: a 503 sets its own)."""
    if response.status_code == 429 and RETRY_HEADER in response.headers:
        response.headers["Retry-After"] = response.headers[RETRY_HEADER]
    return response


def init_app(app: Flask) -> Limiter:
    """Install the limiter on the application (one per application, never shared)."""
    settings = app.config["METACRM_SETTINGS"]
    # Registered before the limiter's own hook, so it runs after it (Flask runs them reversed).
    app.after_request(_retry_after)
    limiter = Limiter(
        get_remote_address,
        app=app,
        storage_uri=settings.redis_url or "memory://",
        application_limits=[settings.api_rate_limit],
        application_limits_exempt_when=lambda: not _is_api(),
        default_limits=[settings.login_rate_limit],
        default_limits_exempt_when=_not_login_post,
        headers_enabled=True,
        # The limiter would otherwise stamp its Retry-After on every response,
        # over the one a 503 busy answer sets; _retry_after copies it for a 429.
        header_name_mapping={HeaderNames.RETRY_AFTER: RETRY_HEADER},
        key_prefix="metacrm",
        strategy="moving-window",
    )
    app.extensions["metacrm.limiter"] = limiter
    return limiter
