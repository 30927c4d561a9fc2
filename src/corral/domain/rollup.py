"""The usage report's arithmetic: one line per (day, VM) from what was measured, each line priced, and the
totals as the sums of the lines (costs in millionths of a cent, so the sum is exact)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date

from corral.domain.errors import InvalidParameter
from corral.domain.pricing import Prices, Quantities, cost_micro_cents
from corral.domain.usage import GIB, KIB, DayUsage

MAX_DAYS = 366
DECIMALS = 6  # figures are shown to six decimals; costs are exact in millionths of a cent

Key = tuple[date, str]  # (day, VM id)


@dataclass(frozen=True)
class Line:
    day: date
    vm_id: str
    cpu_seconds: float
    mem_gib_seconds: float
    disk_gib_hours: float
    egress_bytes: int
    cost_micro_cents: int


@dataclass(frozen=True)
class Totals:
    cpu_seconds: float
    mem_gib_seconds: float
    disk_gib_hours: float
    egress_bytes: int
    cost_micro_cents: int


def parse_range(first: str | None, last: str | None) -> tuple[date, date]:
    """``from`` and ``to`` (inclusive, ``YYYY-MM-DD``), both required, in order, at most 366 days."""
    days: list[date] = []
    for name, raw in (("from", first), ("to", last)):
        if raw is None:
            raise InvalidParameter(f"{name} is required (a date, YYYY-MM-DD)")
        try:
            if len(raw) != 10:
                raise ValueError
            days.append(date.fromisoformat(raw))
        except ValueError:
            raise InvalidParameter(f"{name} must be a date like 2026-02-28, got {raw[:40]!r}") from None
    start, end = days
    if start > end:
        raise InvalidParameter("from must not be after to")
    if (end - start).days + 1 > MAX_DAYS:
        raise InvalidParameter(f"the range may cover at most {MAX_DAYS} days")
    return start, end


def lines(
    measured: Mapping[Key, DayUsage],
    disk_gib_hours: Mapping[Key, float],
    egress_bytes: Mapping[Key, int],
    prices: Prices,
) -> list[Line]:
    """Every (day, VM) with anything to show, by day then VM."""
    out: list[Line] = []
    for day, vm_id in sorted(set(measured) | set(disk_gib_hours) | set(egress_bytes)):
        m = measured.get((day, vm_id), DayUsage())
        q = Quantities(
            cpu_seconds=m.cpu_us / 1_000_000,
            mem_gib_seconds=m.mem_kib_ms * KIB / GIB / 1000,
            disk_gib_hours=disk_gib_hours.get((day, vm_id), 0.0),
            egress_bytes=egress_bytes.get((day, vm_id), 0),
        )
        out.append(
            Line(
                day,
                vm_id,
                round(q.cpu_seconds, DECIMALS),
                round(q.mem_gib_seconds, DECIMALS),
                round(q.disk_gib_hours, DECIMALS),
                q.egress_bytes,
                cost_micro_cents(q, prices),
            )
        )
    return out


def totals(items: list[Line]) -> Totals:
    """The sums of the lines (of their figures as shown, six decimals)."""
    return Totals(
        cpu_seconds=round(sum(x.cpu_seconds for x in items), DECIMALS),
        mem_gib_seconds=round(sum(x.mem_gib_seconds for x in items), DECIMALS),
        disk_gib_hours=round(sum(x.disk_gib_hours for x in items), DECIMALS),
        egress_bytes=sum(x.egress_bytes for x in items),
        cost_micro_cents=sum(x.cost_micro_cents for x in items),
    )
