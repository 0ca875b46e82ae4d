"""Request rate limits (the ``limits`` library): one budget for the API, one for sign-in posts.

The API budget (``api_rate_limit``) is shared by every API route and counted
per client address; sign-in posts (``login_rate_limit``) are counted per
address and route. Counters live in Redis when ``redis_url`` is set, so every
gunicorn worker shares them; the embedded default keeps them in process memory.
A refusal is a 429 ``too_many_requests`` problem with ``Retry-After``; API
answers carry ``X-RateLimit-Limit``, ``-Remaining`` and ``-Reset``.

Counting uses a moving window: exact (a sign-in budget of 30 a minute means
30 in any 60 seconds), at the price of one timestamp per counted request, so at
most the budget's amount per key. In Redis it is ``limits``' moving window; in
process memory it is ``LocalWindows`` below, because ``limits``' memory storage
starts a timer thread every 10 ms of traffic to expire entries. Flask-Limiter,
the Flask extension over ``limits``, was used before; its per-request
bookkeeping cost about 0.15 ms of CPU, as much as a list's SQL (decision record
0010), for two fixed budgets this module applies in a few lines.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from flask import Flask, Response, g, request
from limits import RateLimitItem, parse_many, storage, strategies
from limits.strategies import WindowStats
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


class Counter(Protocol):
    """What the limiter needs of a moving-window counter (``limits`` strategies have it)."""

    def hit(self, item: RateLimitItem, *identifiers: str) -> bool: ...

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats: ...


class LocalWindows:
    """Moving windows in process memory: each key's hit times in a deque, oldest first.

    Expired times are dropped from the front when the key is next counted, and
    keys idle for longer than their window are swept when there are many; no
    thread is involved.
    """

    SWEEP_AT = 10_000

    def __init__(self) -> None:
        self._hits: dict[str, tuple[float, deque[float]]] = {}
        self._lock = threading.Lock()

    def _window(
        self, item: RateLimitItem, identifiers: tuple[str, ...], now: float
    ) -> deque[float]:
        key = item.key_for(*identifiers)
        found = self._hits.get(key)
        if found is None:
            if len(self._hits) >= self.SWEEP_AT:
                self._sweep(now)
            found = self._hits[key] = (float(item.get_expiry()), deque())
        seconds, hits = found
        while hits and hits[0] <= now - seconds:
            hits.popleft()
        return hits

    def _sweep(self, now: float) -> None:
        for key, (seconds, hits) in list(self._hits.items()):
            if not hits or hits[-1] <= now - seconds:
                del self._hits[key]

    def hit(self, item: RateLimitItem, *identifiers: str) -> bool:
        now = time.time()
        with self._lock:
            hits = self._window(item, identifiers, now)
            if len(hits) >= item.amount:
                return False
            hits.append(now)
            return True

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        now = time.time()
        with self._lock:
            hits = self._window(item, identifiers, now)
            reset = (hits[0] if hits else now) + item.get_expiry()
            return WindowStats(reset, item.amount - len(hits))


@dataclass(frozen=True)
class Limiter:
    """The two budgets of one application and the counters they are kept in."""

    api: list[RateLimitItem]
    login: list[RateLimitItem]
    counter: Counter

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
    counter: Counter = LocalWindows()
    if settings.redis_url:
        counter = strategies.MovingWindowRateLimiter(
            storage.storage_from_string(settings.redis_url)
        )
    limiter = Limiter(
        parse_many(settings.api_rate_limit), parse_many(settings.login_rate_limit), counter
    )
    app.before_request(limiter.check)
    app.after_request(limiter.headers)
    app.extensions["metacrm.limiter"] = limiter
    return limiter
