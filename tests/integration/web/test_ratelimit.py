"""API and sign-in rate limits, with counters in process memory and in a real Redis."""

from __future__ import annotations

import dataclasses
import os
import random
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from flask import Flask

from metacrm.runtime.platform import Platform

from ..runtime.test_api_meta import build_app

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(params=["memory", "redis"])
def limited(request: pytest.FixtureRequest, platform: Platform) -> Iterator[Flask]:
    """An app with tiny limits, counting in memory or in Redis."""
    changes = {"api_rate_limit": "3 per minute", "login_rate_limit": "2 per minute"}
    if request.param == "redis":
        changes["redis_url"] = REDIS_URL
    settings = dataclasses.replace(platform.settings, **changes)
    with build_app(settings) as app:
        yield app


def _client(app: Flask) -> tuple[object, str]:
    client = app.test_client()
    # A fresh documentation address per client: counts in Redis outlive a test run.
    h = uuid.uuid4().hex
    ip = f"2001:db8:{h[0:4]}:{h[4:8]}:{h[8:12]}:{h[12:16]}:{h[16:20]}:{h[20:24]}"
    client.environ_base["REMOTE_ADDR"] = ip
    return client, ip


def test_api_limit_is_shared_by_every_api_route(limited: Flask) -> None:
    client, _ = _client(limited)
    slug = "nosuchtenant"
    answers = [
        client.get(f"/t/{slug}/api/v1/meta/"),
        client.get(f"/t/{slug}/api/v1/records/customer"),
        client.get(f"/t/{slug}/api/v1/users"),
        client.get(f"/t/{slug}/api/v1/tokens"),
    ]
    assert [a.status_code for a in answers] == [401, 401, 401, 429]
    refused = answers[-1]
    assert refused.mimetype == "application/problem+json"
    assert refused.json["code"] == "too_many_requests"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # Only a refusal says when to retry (a 503 busy answer sets its own value).
    assert "Retry-After" not in answers[0].headers
    assert answers[0].headers["X-RateLimit-Limit"] == "3"
    # Pages outside the API are not counted against it.
    assert client.get("/login").status_code == 200
    # Another address has its own budget.
    other, _ = _client(limited)
    assert other.get(f"/t/{slug}/api/v1/meta/").status_code == 401


def test_api_answers_tell_the_budget_left_after_each_request(limited: Flask) -> None:
    client, _ = _client(limited)
    answers = [client.get("/t/nosuchtenant/api/v1/meta/") for _ in range(4)]
    assert [a.headers.get("X-RateLimit-Remaining") for a in answers] == ["2", "1", "0", None]
    for answer in answers[:3]:
        assert answer.headers["X-RateLimit-Limit"] == "3"
        assert time.time() - 1 <= int(answer.headers["X-RateLimit-Reset"]) <= time.time() + 61
        assert answer.headers.getlist("X-RateLimit-Limit") == ["3"]  # told once
    # A refusal says when to retry instead.
    assert answers[3].status_code == 429 and "X-RateLimit-Limit" not in answers[3].headers


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_budget(platform: Platform) -> None:
    settings = dataclasses.replace(
        platform.settings, api_rate_limit="2 per minute", trusted_proxies=1
    )
    with build_app(settings) as app:
        client, _ = _client(app)  # the proxy's own address, the same for every client
        one, other = (f"198.51.100.{n}" for n in random.sample(range(1, 255), 2))

        def get(forwarded: str) -> int:
            headers = {"X-Forwarded-For": forwarded}
            return client.get("/t/x/api/v1/meta/", headers=headers).status_code

        assert [get(one), get(one), get(one), get(other)] == [401, 401, 429, 401]


def test_a_counter_that_fails_gets_a_problem_answer_not_a_bare_error(platform: Platform) -> None:
    """Redis gone: the middleware's failure is answered by the application, and logged."""
    settings = dataclasses.replace(platform.settings, redis_url="redis://127.0.0.1:1/0")
    with build_app(settings) as app:
        client, _ = _client(app)
        answer = client.get("/t/x/api/v1/meta/")
        assert answer.status_code == 500
        assert answer.mimetype == "application/problem+json"
        assert answer.json["code"] == "internal_error"
        assert "X-RateLimit-Limit" not in answer.headers
        # Pages outside the API do not count, so they still answer.
        assert client.get("/login").status_code == 200


def test_login_posts_are_limited_per_address(limited: Flask) -> None:
    client, _ = _client(limited)
    for _ in range(3):  # GETs of the form are not limited
        assert client.get("/login").status_code == 200
    statuses = [
        client.post("/login", data={"email": "x@example.com", "password": "p"}).status_code
        for _ in range(3)
    ]
    # No CSRF token: refused with 400 while under the limit, then 429.
    assert statuses == [400, 400, 429]


def test_redis_holds_the_counters(platform: Platform) -> None:
    settings = dataclasses.replace(
        platform.settings, api_rate_limit="2 per minute", redis_url=REDIS_URL
    )
    store = redis.Redis.from_url(REDIS_URL)
    with build_app(settings) as first, build_app(settings) as second:
        client, ip = _client(first)
        assert client.get("/t/x/api/v1/meta/").status_code == 401
        # A second worker (another app on the same Redis) sees the same count.
        again = second.test_client()
        again.environ_base["REMOTE_ADDR"] = ip
        assert again.get("/t/x/api/v1/meta/").status_code == 401
        assert again.get("/t/x/api/v1/meta/").status_code == 429
    assert any(ip.encode() in key for key in store.scan_iter("LIMITS:*LIMITER/metacrm/*"))
    store.close()
