"""Time as an interface: the fake clock and the API's timestamp format."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from corral.domain.clock import Clock, FakeClock, SystemClock, iso


def test_fake_clock_advances_both_clocks() -> None:
    clock = FakeClock()
    start, mono = clock.now(), clock.monotonic()
    assert start == datetime(2026, 1, 1, tzinfo=UTC)
    clock.advance(90.5)
    assert clock.now() - start == timedelta(seconds=90.5)
    assert clock.monotonic() - mono == 90.5


def test_fake_clock_start() -> None:
    start = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert FakeClock(start).now() == start


@pytest.mark.parametrize("clock", [SystemClock(), FakeClock()])
def test_clocks_give_aware_utc_time(clock: Clock) -> None:
    assert clock.now().utcoffset() == timedelta(0)
    assert isinstance(clock.monotonic(), float)


def test_system_monotonic_never_goes_back() -> None:
    clock = SystemClock()
    stamps = [clock.monotonic() for _ in range(100)]
    assert stamps == sorted(stamps)


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05Z"),
        (datetime(2026, 1, 2, 3, 4, 5, 999_999, tzinfo=UTC), "2026-01-02T03:04:05Z"),  # truncated
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2))), "2026-01-02T01:04:05Z"),
        (datetime(2026, 1, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=5))), "2025-12-31T20:00:00Z"),
    ],
)
def test_iso(stamp: datetime, expected: str) -> None:
    assert iso(stamp) == expected
