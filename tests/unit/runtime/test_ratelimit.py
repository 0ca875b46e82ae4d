"""The in-process moving window behind the rate limits (``ratelimit.LocalWindows``)."""

from __future__ import annotations

import pytest
from limits import RateLimitItem, parse

from metacrm.runtime import ratelimit
from metacrm.runtime.ratelimit import LocalWindows


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1_000_000.0]
    monkeypatch.setattr(ratelimit.time, "time", lambda: now[0])
    return now


def hit(windows: LocalWindows, item: RateLimitItem, key: tuple[str, ...]) -> bool:
    """Spend one hit; True when it was allowed."""
    return windows.spend(item, key) is not None


def test_the_budget_is_exact_over_any_window(clock: list[float]) -> None:
    windows, item = LocalWindows(), parse("3 per minute")
    assert [hit(windows, item, ("api", "a")) for _ in range(4)] == [True, True, True, False]
    clock[0] += 30
    assert not hit(windows, item, ("api", "a"))  # all three are still inside the last minute
    clock[0] += 30.001
    assert hit(windows, item, ("api", "a"))  # the first three left the window together
    assert hit(windows, item, ("api", "a"))
    assert hit(windows, item, ("api", "a"))
    assert not hit(windows, item, ("api", "a"))


def test_keys_and_budgets_are_counted_apart(clock: list[float]) -> None:
    windows, item = LocalWindows(), parse("1 per minute")
    assert hit(windows, item, ("api", "a"))
    assert not hit(windows, item, ("api", "a"))
    assert hit(windows, item, ("api", "b"))
    assert hit(windows, item, ("signin.login", "a"))
    assert hit(windows, parse("2 per minute"), ("api", "a"))


def test_window_stats_say_what_is_left_and_when_the_oldest_hit_leaves(clock: list[float]) -> None:
    windows, item = LocalWindows(), parse("5 per minute")
    start = clock[0]
    assert hit(windows, item, ("api", "a"))
    clock[0] += 10
    after = windows.spend(item, ("api", "a"))
    assert after is not None and after.remaining == 3  # the window the hit left
    assert after.reset_time == pytest.approx(start + 60)
    stats = windows.window(item, ("api", "a"))
    assert stats.remaining == 3
    assert stats.reset_time == pytest.approx(start + 60)
    fresh = windows.window(item, ("api", "z"))
    assert fresh.remaining == 5


def test_idle_keys_are_swept_when_there_are_many(
    clock: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(LocalWindows, "SWEEP_AT", 3)
    windows, item = LocalWindows(), parse("1 per second")
    for address in ("a", "b", "c"):
        hit(windows, item, ("api", address))
    clock[0] += 2
    hit(windows, item, ("api", "d"))  # the fourth key finds three idle ones and drops them
    assert len(windows._hits) == 1
    assert hit(windows, item, ("api", "a"))
