"""Accounting, the I/O half of ``corral.domain.usage``: cgroup samples into each VM's totals and per-day rows,
the history of destroyed VMs, and the usage report (``GET /v1/usage``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from corral.domain import rollup, usage
from corral.domain.clock import Clock
from corral.domain.pagination import ListSpec, Page, PageRequest
from corral.domain.pricing import Prices
from corral.domain.vm_states import Detail
from corral.runtime.cgroup_usage import UsageReader
from corral.store.db import transaction
from corral.store.paging import SortColumns, paginate
from corral.store.tables import EgressEvent, Vm, VmUsageDay

HISTORY = ListSpec(default_limit=20, max_limit=100, sorts=("destroyed_at", "created_at"))
_HISTORY_SORTS: SortColumns = {
    "destroyed_at": (Vm.destroyed_at, datetime),
    "created_at": (Vm.created_at, datetime),
}


def meter_of(vm: Vm) -> usage.Meter:
    return usage.Meter(
        at=vm.meter_at,
        cpu_ns=vm.meter_cpu_ns,
        mem_bytes=vm.meter_mem_bytes,
        total_cpu_us=vm.cpu_us,
        total_uptime_ms=vm.uptime_ms,
        mem_peak_bytes=vm.mem_peak_bytes,
    )


def _put(vm: Vm, meter: usage.Meter) -> None:
    vm.meter_at = meter.at
    vm.meter_cpu_ns = meter.cpu_ns
    vm.meter_mem_bytes = meter.mem_bytes
    vm.cpu_us = meter.total_cpu_us
    vm.uptime_ms = meter.total_uptime_ms
    vm.mem_peak_bytes = meter.mem_peak_bytes


def _add_days(session: Session, vm: Vm, days: dict[date, usage.DayUsage]) -> None:
    for day, used in days.items():
        row = session.get(VmUsageDay, (vm.id, day))
        if row is None:
            session.add(
                VmUsageDay(
                    vm_id=vm.id,
                    day=day,
                    user_id=vm.user_id,
                    cpu_us=used.cpu_us,
                    mem_kib_ms=used.mem_kib_ms,
                    uptime_ms=used.uptime_ms,
                )
            )
        else:
            row.cpu_us += used.cpu_us
            row.mem_kib_ms += used.mem_kib_ms
            row.uptime_ms += used.uptime_ms


class UsageMeter:
    """Samples the cgroups of running VMs. The lifecycle calls ``begin`` when a VM comes up and ``end``
    before its sandbox ends (stop, hibernate, rollback, failure); a background loop calls ``sample_all``."""

    def __init__(self, sessions: sessionmaker[Session], clock: Clock, reader: UsageReader) -> None:
        self.sessions = sessions
        self.clock = clock
        self.reader = reader

    def begin(self, vm_id: str) -> None:
        """The VM runs now (a meter that already runs, as for a VM adopted at start, keeps running)."""
        with transaction(self.sessions) as session:
            vm = session.get(Vm, vm_id)
            if vm is None or vm.meter_at is not None or not vm.container_id:
                return
            _put(vm, usage.start(meter_of(vm), self.reader.read(vm.container_id), self.clock.now()))

    def sample(self, vm_id: str, *, running: bool = True) -> None:
        with transaction(self.sessions) as session:
            vm = session.get(Vm, vm_id)
            if vm is None or vm.meter_at is None:
                return
            reading = self.reader.read(vm.container_id) if vm.container_id else None
            meter, days = usage.sample(meter_of(vm), reading, self.clock.now(), running=running)
            _put(vm, meter)
            _add_days(session, vm, days)

    def end(self, vm_id: str) -> None:
        self.sample(vm_id, running=False)

    def running(self) -> list[str]:
        with self.sessions() as session:
            return list(session.scalars(select(Vm.id).where(Vm.meter_at.is_not(None))))


# ---- reading ------------------------------------------------------------------------------------------------


def list_history(session: Session, user_id: str, request: PageRequest) -> Page[Vm]:
    stmt = select(Vm).where(
        Vm.user_id == user_id,
        Vm.status_detail == Detail.DESTROYED.value,
        Vm.destroyed_at.is_not(None),
    )
    return paginate(
        session, stmt, request=request, sort_columns=_HISTORY_SORTS, id_column=Vm.id, render=lambda r: r
    )


@dataclass(frozen=True)
class Report:
    first: date
    last: date
    prices: Prices
    lines: list[rollup.Line]
    totals: rollup.Totals
    names: dict[str, str]  # VM id -> name


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def report(
    session: Session,
    user_id: str,
    first: date,
    last: date,
    prices: Prices,
    now: datetime,
    *,
    vm_id: str | None = None,
) -> Report:
    begin, end = _midnight(first), _midnight(last + timedelta(days=1))
    vm_stmt = select(Vm).where(
        Vm.user_id == user_id,
        Vm.created_at < end,
        (Vm.destroyed_at.is_(None)) | (Vm.destroyed_at >= begin),
    )
    day_stmt = select(VmUsageDay).where(
        VmUsageDay.user_id == user_id, VmUsageDay.day >= first, VmUsageDay.day <= last
    )
    egress_stmt = select(
        EgressEvent.vm_id, EgressEvent.timestamp, EgressEvent.bytes_up, EgressEvent.bytes_down
    ).where(
        EgressEvent.user_id == user_id,
        EgressEvent.timestamp >= begin,
        EgressEvent.timestamp < end,
        EgressEvent.vm_id.is_not(None),
        EgressEvent.bytes_up.is_not(None),
    )
    if vm_id is not None:
        vm_stmt = vm_stmt.where(Vm.id == vm_id)
        day_stmt = day_stmt.where(VmUsageDay.vm_id == vm_id)
        egress_stmt = egress_stmt.where(EgressEvent.vm_id == vm_id)
    names: dict[str, str] = {}
    disk: dict[rollup.Key, float] = {}
    for vm in session.scalars(vm_stmt):
        names[vm.id] = vm.name
        ended = vm.destroyed_at or now
        for day, hours in usage.existence_hours_by_day(vm.created_at, ended, first, last).items():
            disk[(day, vm.id)] = hours * vm.disk_mib / 1024
    measured = {
        (row.day, row.vm_id): usage.DayUsage(row.cpu_us, row.mem_kib_ms, row.uptime_ms)
        for row in session.scalars(day_stmt)
    }
    egress: dict[rollup.Key, int] = defaultdict(int)
    for ev_vm, stamp, up, down in session.execute(egress_stmt):
        if ev_vm is not None:
            egress[(stamp.astimezone(UTC).date(), ev_vm)] += (up or 0) + (down or 0)
    missing = {v for _, v in (*measured, *egress)} - set(names)
    if missing:
        names.update(session.execute(select(Vm.id, Vm.name).where(Vm.id.in_(missing))).tuples())
    items = rollup.lines(measured, disk, egress, prices)
    return Report(first, last, prices, items, rollup.totals(items), names)


def lifetime_costs(
    session: Session, user_id: str, rows: list[Vm], prices: Prices, now: datetime
) -> dict[str, int]:
    """What each VM cost over its whole life, in millionths of a cent: the sum of its usage lines."""
    if not rows:
        return {}
    ids = [vm.id for vm in rows]
    measured = {
        (row.day, row.vm_id): usage.DayUsage(row.cpu_us, row.mem_kib_ms, row.uptime_ms)
        for row in session.scalars(select(VmUsageDay).where(VmUsageDay.vm_id.in_(ids)))
    }
    disk: dict[rollup.Key, float] = {}
    for vm in rows:
        ended = vm.destroyed_at or now
        for day, hours in usage.existence_hours_by_day(vm.created_at, ended, date.min, date.max).items():
            disk[(day, vm.id)] = hours * vm.disk_mib / 1024
    egress: dict[rollup.Key, int] = defaultdict(int)
    for ev_vm, stamp, up, down in session.execute(
        select(EgressEvent.vm_id, EgressEvent.timestamp, EgressEvent.bytes_up, EgressEvent.bytes_down).where(
            EgressEvent.user_id == user_id, EgressEvent.vm_id.in_(ids), EgressEvent.bytes_up.is_not(None)
        )
    ):
        if ev_vm is not None:
            egress[(stamp.astimezone(UTC).date(), ev_vm)] += (up or 0) + (down or 0)
    out: dict[str, int] = dict.fromkeys(ids, 0)
    for line in rollup.lines(measured, disk, egress, prices):
        out[line.vm_id] += line.cost_micro_cents
    return out
