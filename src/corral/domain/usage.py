"""Accounting arithmetic, free of I/O: what one cgroup sample adds to a VM's totals and to each UTC day.

A running VM has a *meter*: the time of its last sample and the counters read then. Each new sample adds
the CPU time the counter grew by (a counter lower than before belongs to a new cgroup, after a restart or a
restore, so all of it is new), the time between the two samples as uptime, and the memory in use over that
time (the mean of the two readings times the time between them). Everything is split over the UTC days the
time between the samples spans, in proportion, with integer parts that add up exactly to the whole.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta

KIB = 1024
GIB = 1024**3
MS_PER_DAY = 86_400_000


@dataclass(frozen=True)
class Reading:
    """What the kernel says about a sandbox's cgroup at one moment."""

    cpu_ns: int  # CPU time used since the cgroup was made
    mem_bytes: int  # memory in use now (page cache included)
    mem_peak_bytes: int  # the most in use since the cgroup was made


@dataclass(frozen=True)
class Meter:
    """A VM's accounting state: the last sample (None: not running, nothing to add) and its totals."""

    at: datetime | None = None
    cpu_ns: int = 0
    mem_bytes: int = 0
    total_cpu_us: int = 0
    total_uptime_ms: int = 0
    mem_peak_bytes: int = 0


@dataclass(frozen=True)
class DayUsage:
    cpu_us: int = 0
    mem_kib_ms: int = 0  # memory in use integrated over time
    uptime_ms: int = 0


def counter_delta(previous: int, current: int) -> int:
    """How much a cumulative counter grew since ``previous``. A counter below the previous reading was
    reset (its cgroup is new), so everything it holds is new."""
    return current - previous if current >= previous else current


def start(meter: Meter, reading: Reading | None, now: datetime) -> Meter:
    """The VM runs from ``now``: later samples count from this reading (what a sandbox used before it was
    the VM's, e.g. while it waited in the warm pool, is not the VM's)."""
    r = reading or Reading(0, 0, 0)
    return replace(
        meter,
        at=now,
        cpu_ns=r.cpu_ns,
        mem_bytes=r.mem_bytes,
        mem_peak_bytes=max(meter.mem_peak_bytes, r.mem_peak_bytes),
    )


def day_spans(begin: datetime, end: datetime) -> list[tuple[date, int]]:
    """The UTC days ``[begin, end)`` overlaps, each with the milliseconds of the span in it (in order; empty
    when ``end`` is not after ``begin``)."""
    out: list[tuple[date, int]] = []
    cursor = begin.astimezone(UTC)
    end = end.astimezone(UTC)
    while cursor < end:
        midnight = datetime.combine(cursor.date() + timedelta(days=1), time(), tzinfo=UTC)
        upto = min(midnight, end)
        out.append((cursor.date(), _ms(upto - cursor)))
        cursor = upto
    return out


def _ms(delta: timedelta) -> int:
    return delta.days * MS_PER_DAY + delta.seconds * 1000 + delta.microseconds // 1000


def apportion(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` as integers that add up to ``total`` exactly (the last
    share takes what rounding down left). All to the last share when the weights are all zero."""
    if not weights:
        return []
    whole = sum(weights)
    if whole <= 0:
        return [0] * (len(weights) - 1) + [total]
    shares = [total * w // whole for w in weights[:-1]]
    return [*shares, total - sum(shares)]


def sample(
    meter: Meter, reading: Reading | None, now: datetime, *, running: bool = True
) -> tuple[Meter, dict[date, DayUsage]]:
    """Add what happened since the meter's last sample. ``running`` False ends the meter (the VM stops,
    hibernates or fails). ``reading`` None (no cgroup: the sandbox ended unobserved) adds nothing: what
    happened since the last sample is unknown. A meter that is not running adds nothing."""
    if meter.at is None:
        return meter, {}
    if reading is None:
        return (meter if running else replace(meter, at=None)), {}
    spans = day_spans(meter.at, now)
    span_ms = sum(ms for _, ms in spans)
    cpu_us = counter_delta(meter.cpu_ns, reading.cpu_ns) // 1000
    mem_kib_ms = (meter.mem_bytes + reading.mem_bytes) * span_ms // (2 * KIB)
    weights = [ms for _, ms in spans]
    days: dict[date, DayUsage] = {}
    if spans:
        for (day, ms), cpu, mem in zip(
            spans, apportion(cpu_us, weights), apportion(mem_kib_ms, weights), strict=True
        ):
            days[day] = DayUsage(cpu, mem, ms)
    elif cpu_us:  # no time passed (a clock step back): the CPU still counts, on today
        days[now.astimezone(UTC).date()] = DayUsage(cpu_us, 0, 0)
    updated = Meter(
        at=now if running else None,
        cpu_ns=reading.cpu_ns,
        mem_bytes=reading.mem_bytes,
        total_cpu_us=meter.total_cpu_us + cpu_us,
        total_uptime_ms=meter.total_uptime_ms + span_ms,
        mem_peak_bytes=max(meter.mem_peak_bytes, reading.mem_peak_bytes, reading.mem_bytes),
    )
    return updated, days


def existence_hours_by_day(created: datetime, ended: datetime, first: date, last: date) -> dict[date, float]:
    """Hours of ``[created, ended)`` in each UTC day from ``first`` to ``last`` (inclusive)."""
    out: dict[date, float] = {}
    for day, ms in day_spans(created, ended):
        if first <= day <= last:
            out[day] = ms / 3_600_000
    return out
