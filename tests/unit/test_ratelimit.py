"""Token buckets, driven by a fake clock (plain floats passed as ``now``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.domain.ratelimit import Limit, RateLimiter

EPS = 1e-9


@pytest.mark.parametrize(
    ("count", "burst", "rate", "expected_burst"),
    [
        (60, None, 1.0, 60),
        (600, 100, 10.0, 100),
        (1, None, 1 / 60, 1),
        (0, None, 0.0, 1),
    ],
)
def test_per_minute(count: int, burst: int | None, rate: float, expected_burst: int) -> None:
    limit = Limit.per_minute(count, burst)
    assert limit.rate == pytest.approx(rate)
    assert limit.burst == expected_burst


@pytest.mark.parametrize("limit", [Limit(rate=0, burst=1), Limit(rate=-1, burst=5), Limit(rate=1, burst=0)])
def test_rejects_a_useless_limit(limit: Limit) -> None:
    with pytest.raises(ValueError, match="rate must be positive"):
        RateLimiter(limit)


def test_burst_then_retry_after() -> None:
    limiter = RateLimiter(Limit(rate=0.5, burst=3))
    assert [limiter.take("k", 100.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.take("k", 100.0) == 2  # one token takes 2 s at 0.5/s
    assert limiter.take("k", 101.0) == 1  # half a token already back
    assert limiter.take("k", 102.0) == 0
    assert limiter.take("k", 102.0) == 2


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    limiter = RateLimiter(Limit(rate=100.0, burst=1))
    assert limiter.take("k", 0.0) == 0
    assert limiter.take("k", 0.0) == 1  # 10 ms to wait, reported as 1 s


def test_keys_are_independent() -> None:
    limiter = RateLimiter(Limit(rate=1.0, burst=1))
    assert limiter.take("a", 0.0) == 0
    assert limiter.take("a", 0.0) > 0
    assert limiter.take("b", 0.0) == 0


def test_refill_is_capped_at_burst() -> None:
    limiter = RateLimiter(Limit(rate=1.0, burst=2))
    assert limiter.take("k", 0.0) == 0
    results = [limiter.take("k", 1_000_000.0) for _ in range(3)]
    assert results == [0, 0, 1]


def test_least_recently_used_key_is_dropped_as_a_full_bucket() -> None:
    limiter = RateLimiter(Limit(rate=0.001, burst=1), max_keys=2)
    assert limiter.take("a", 0.0) == 0
    assert limiter.take("b", 0.0) == 0
    assert limiter.take("a", 0.0) > 0  # "a" is now the most recently used
    assert limiter.take("c", 0.0) == 0  # evicts "b"
    assert limiter.take("a", 0.0) > 0  # "a" kept its empty bucket
    assert limiter.take("b", 0.0) == 0  # "b" comes back full (evicting "c")
    assert limiter.take("b", 0.0) > 0


_limits = st.builds(
    Limit,
    rate=st.floats(min_value=0.01, max_value=50.0),
    burst=st.integers(min_value=1, max_value=20),
)


def _within_bound(limit: Limit, times: list[float], allowed: list[bool]) -> None:
    """In every window [t_i, t_j] of the schedule, allowed <= burst + rate * (t_j - t_i)."""
    for i in range(len(times)):
        count = 0
        for j in range(i, len(times)):
            count += allowed[j]
            assert count <= limit.burst + limit.rate * (times[j] - times[i]) + EPS, (i, j)


@settings(max_examples=100, deadline=None)
@given(_limits, st.floats(0, 1e6), st.lists(st.floats(min_value=0, max_value=5.0), min_size=1, max_size=80))
def test_never_more_than_burst_plus_rate_times_elapsed(limit: Limit, start: float, gaps: list[float]) -> None:
    limiter = RateLimiter(limit)
    times: list[float] = []
    now = start
    for gap in gaps:
        now += gap
        times.append(now)
    allowed = [limiter.take("k", t) == 0 for t in times]
    _within_bound(limit, times, allowed)


@settings(max_examples=100, deadline=None)
@given(
    st.builds(
        Limit, rate=st.floats(min_value=0.5, max_value=4.0), burst=st.integers(min_value=1, max_value=3)
    ),
    st.lists(st.sampled_from([0.0, 0.25, 0.5]), min_size=1, max_size=40),
)
def test_bound_holds_when_concurrent_requests_reach_the_lock_out_of_order(
    limit: Limit, offsets: list[float]
) -> None:
    # Each request reads the clock before it takes the limiter's lock (api/deps.py), so under a thread
    # pool the stamps can reach the limiter out of order. That must not mint extra tokens.
    arrival = [1000.0 + offset for offset in offsets]
    limiter = RateLimiter(limit)
    allowed = sum(limiter.take("k", t) == 0 for t in arrival)
    span = max(arrival) - min(arrival)
    assert allowed <= limit.burst + limit.rate * span + EPS


def test_out_of_order_stamps_do_not_refill_twice() -> None:
    limit = Limit(rate=1.0, burst=10)
    limiter = RateLimiter(limit)
    assert all(limiter.take("k", 0.0) == 0 for _ in range(10))
    allowed = 0
    for _ in range(20):  # two requests racing: stamps 0.5 and 1.0 reach the lock in either order
        allowed += limiter.take("k", 1.0) == 0
        allowed += limiter.take("k", 0.5) == 0
    # Over the one second from 0.0 to 1.0 at most one more token can have been earned.
    assert allowed <= 1


@settings(max_examples=200, deadline=None)
@given(_limits, st.floats(0, 1e6), st.integers(min_value=0, max_value=30))
def test_waiting_retry_after_is_enough(limit: Limit, start: float, extra: int) -> None:
    limiter = RateLimiter(limit)
    now = start
    for _ in range(limit.burst + extra):
        limiter.take("k", now)
    wait = limiter.take("k", now)
    if wait == 0:
        return
    assert wait >= 1
    assert limiter.take("k", now + wait) == 0
