"""Request rate limits (the ``limits`` library): one budget for the API, one for sign-in posts.

The API budget (``api_rate_limit``) is shared by every API route and counted
per client address; sign-in posts (``login_rate_limit``) are counted per
address and route. Counters live in Redis when ``redis_url`` is set, so every
gunicorn worker shares them; the embedded default keeps them in process memory.
A refusal is a 429 ``too_many_requests`` problem with ``Retry-After``; API
answers carry ``X-RateLimit-Limit``, ``-Remaining`` and ``-Reset``.

Counting uses ``limits``' moving window: exact (a sign-in budget of 30 a
minute means 30 in any 60 seconds), at the price of one timestamp per counted
request, so at most the budget's amount per key. Flask-Limiter, the Flask
extension over the same library, was used before; its per-request bookkeeping
cost about 0.15 ms of CPU, as much as a list's SQL (decision record 0010), for
two fixed budgets this module applies in a few lines.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from flask import Flask, Response, g, request
from limits import RateLimitItem, parse_many, storage, strategies
from werkzeug.exceptions import TooManyRequests

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
KEY_PREFIX = "metacrm"


def _is_api() -> bool:
    parts = request.path.split("/", 5)
    # /t/<tenant>/api/...
    return len(parts) > 3 and parts[1] == "t" and parts[3] == "api"


@dataclass(frozen=True)
class Limiter:
    """The two budgets of one application and the counters they are kept in."""

    api: list[RateLimitItem]
    login: list[RateLimitItem]
    counter: strategies.MovingWindowRateLimiter

    def check(self) -> None:
        """Count the request against its budget; 429 when one is spent."""
        address = request.remote_addr or "unknown"
        if _is_api():
            g.metacrm_rate = (self.api[0], ("api", address))
            self._spend(self.api, ("api", address))
        elif request.method == "POST" and request.endpoint in LOGIN_ENDPOINTS:
            self._spend(self.login, (request.endpoint, address))

    def _spend(self, items: list[RateLimitItem], key: tuple[str, ...]) -> None:
        for item in items:
            if not self.counter.hit(item, KEY_PREFIX, *key):
                stats = self.counter.get_window_stats(item, KEY_PREFIX, *key)
                wait = max(1, math.ceil(stats.reset_time - time.time()))
                raise TooManyRequests(
                    description=f"more than {item} from this address; retry in {wait} s",
                    retry_after=wait,
                )

    def headers(self, response: Response) -> Response:
        """Tell an API client its budget (the first, tightest-listed rate)."""
        found = g.pop("metacrm_rate", None)
        if found is None:
            return response
        item, key = found
        stats = self.counter.get_window_stats(item, KEY_PREFIX, *key)
        response.headers["X-RateLimit-Limit"] = str(item.amount)
        response.headers["X-RateLimit-Remaining"] = str(max(0, stats.remaining))
        response.headers["X-RateLimit-Reset"] = str(math.ceil(stats.reset_time))
        return response


def init_app(app: Flask) -> Limiter:
    """Install the limits on the application (one set of counters per application)."""
    settings = app.config["METACRM_SETTINGS"]
    limiter = Limiter(
        parse_many(settings.api_rate_limit),
        parse_many(settings.login_rate_limit),
        strategies.MovingWindowRateLimiter(
            storage.storage_from_string(settings.redis_url or "memory://")
        ),
    )
    app.before_request(limiter.check)
    app.after_request(limiter.headers)
    app.extensions["metacrm.limiter"] = limiter
    return limiter
