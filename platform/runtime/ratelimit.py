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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from flask import Flask, request
from limits import RateLimitItem, parse_many, storage, strategies
from limits.strategies import WindowStats
from werkzeug.exceptions import TooManyRequests

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

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


def _is_api(path: str) -> bool:
    parts = path.split("/", 4)
    # /t/<tenant>/api/...
    return len(parts) > 3 and parts[1] == "t" and parts[3] == "api"


class Counter(Protocol):
    """What the limiter needs of a moving-window counter."""

    def spend(self, item: RateLimitItem, key: tuple[str, ...]) -> WindowStats | None:
        """Count one hit unless the budget is spent; the window after it, or None when refused."""
        ...

    def window(self, item: RateLimitItem, key: tuple[str, ...]) -> WindowStats:
        """The window as it is now (what is left, when the oldest hit leaves it)."""
        ...


class LocalWindows:
    """Moving windows in process memory: each key's hit times in a deque, oldest first.

    Expired times are dropped from the front when the key is next counted, and
    keys idle for longer than their window are swept when there are many; no
    thread is involved. A hit and the window it leaves are one step, under one
    lock, because every API request asks for both.
    """

    SWEEP_AT = 10_000

    def __init__(self) -> None:
        # Keyed by the item's id, not the item: ``RateLimitItem`` hashes and compares in
        # Python, twice per request. The entry holds the item, so its id stays its own.
        self._hits: dict[tuple[int, tuple[str, ...]], tuple[RateLimitItem, float, deque[float]]]
        self._hits = {}
        self._lock = threading.Lock()

    def _window(
        self, item: RateLimitItem, key: tuple[str, ...], now: float
    ) -> tuple[float, deque[float]]:
        """The budget's length in seconds and the key's hits inside it now."""
        found = self._hits.get((id(item), key))
        if found is None:
            if len(self._hits) >= self.SWEEP_AT:
                self._sweep(now)
            found = self._hits[(id(item), key)] = (item, float(item.get_expiry()), deque())
        _, seconds, hits = found
        while hits and hits[0] <= now - seconds:
            hits.popleft()
        return seconds, hits

    def _sweep(self, now: float) -> None:
        for key, (_, seconds, hits) in list(self._hits.items()):
            if not hits or hits[-1] <= now - seconds:
                del self._hits[key]

    def spend(self, item: RateLimitItem, key: tuple[str, ...]) -> WindowStats | None:
        now = time.time()
        with self._lock:
            seconds, hits = self._window(item, key, now)
            if len(hits) >= item.amount:
                return None
            hits.append(now)
            return WindowStats(hits[0] + seconds, item.amount - len(hits))

    def window(self, item: RateLimitItem, key: tuple[str, ...]) -> WindowStats:
        now = time.time()
        with self._lock:
            seconds, hits = self._window(item, key, now)
            return WindowStats((hits[0] if hits else now) + seconds, item.amount - len(hits))


class SharedWindows:
    """Moving windows in Redis (``limits``' strategy), shared by every worker process."""

    def __init__(self, strategy: strategies.MovingWindowRateLimiter) -> None:
        self._strategy = strategy

    def spend(self, item: RateLimitItem, key: tuple[str, ...]) -> WindowStats | None:
        if not self._strategy.hit(item, KEY_PREFIX, *key):
            return None
        return self._strategy.get_window_stats(item, KEY_PREFIX, *key)

    def window(self, item: RateLimitItem, key: tuple[str, ...]) -> WindowStats:
        return self._strategy.get_window_stats(item, KEY_PREFIX, *key)


#: Where the limiter leaves a refusal, or a counter's failure, for the application to answer.
REFUSAL = "metacrm.rate_refusal"
_LIMIT, _REMAINING, _RESET = "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"


@dataclass(frozen=True)
class Limiter:
    """The two budgets of one application and the counters they are kept in.

    The API budget is counted in WSGI middleware (``wrap``), around the Flask
    application: a before/after hook pair, ``g`` and three ``Headers.add``
    validations per request cost about a tenth of a read by id's throughput
    under load. A refusal is still answered by the application (its problem
    document): the middleware leaves it in the environ and ``check`` raises it,
    as it does with any error of the counter (Redis gone: a logged 500 problem,
    as from a hook). Sign-in posts are counted in ``check``, which needs the route.
    """

    api: list[RateLimitItem]
    login: list[RateLimitItem]
    counter: Counter

    def wrap(self, app: WSGIApplication) -> WSGIApplication:
        """Return ``app`` with API requests counted and told their budget in headers."""
        limit = str(self.api[0].amount)

        def limited(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            if not _is_api(environ.get("PATH_INFO", "")):
                return app(environ, start_response)
            # Behind trusted proxies ProxyFix, outside this middleware, has set the address.
            address = environ.get("REMOTE_ADDR") or "unknown"
            try:
                stats = self._spend(self.api, ("api", address))
            except Exception as refusal:  # answered inside the application, see ``check``
                environ[REFUSAL] = refusal
                return app(environ, start_response)
            # The first (tightest-listed) rate as it stands after this hit.
            told = [
                (_LIMIT, limit),
                (_REMAINING, str(max(0, stats.remaining))),
                (_RESET, str(math.ceil(stats.reset_time))),
            ]

            def start(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
                headers.extend(told)
                return start_response(status, headers, *exc_info)

            return app(environ, start)

        return limited

    def check(self) -> None:
        """Answer the middleware's refusal; count a sign-in post against its budget."""
        environ = request.environ
        refusal = environ.get(REFUSAL)
        if refusal is not None:
            raise refusal
        if environ.get("REQUEST_METHOD") == "POST" and request.endpoint in LOGIN_ENDPOINTS:
            address = environ.get("REMOTE_ADDR") or "unknown"
            self._spend(self.login, (request.endpoint, address))

    def _spend(self, items: list[RateLimitItem], key: tuple[str, ...]) -> WindowStats:
        """Spend one hit of every budget; return the first budget's window after it."""
        first = None
        for item in items:
            stats = self.counter.spend(item, key)
            if stats is None:
                stats = self.counter.window(item, key)
                wait = max(1, math.ceil(stats.reset_time - time.time()))
                raise TooManyRequests(
                    description=f"more than {item} from this address; retry in {wait} s",
                    retry_after=wait,
                )
            first = stats if first is None else first
        assert first is not None, "a budget has at least one rate"
        return first


def init_app(app: Flask) -> Limiter:
    """Install the limits on the application (one set of counters per application).

    Call it before anything else wraps ``app.wsgi_app`` (ProxyFix goes outside).
    """
    settings = app.config["METACRM_SETTINGS"]
    counter: Counter = LocalWindows()
    if settings.redis_url:
        counter = SharedWindows(
            strategies.MovingWindowRateLimiter(storage.storage_from_string(settings.redis_url))
        )
    limiter = Limiter(
        parse_many(settings.api_rate_limit), parse_many(settings.login_rate_limit), counter
    )
    app.wsgi_app = limiter.wrap(app.wsgi_app)  # type: ignore[method-assign]
    app.before_request(limiter.check)
    app.extensions["metacrm.limiter"] = limiter
    return limiter
