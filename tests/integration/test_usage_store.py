"""The accounting's store half (``corral.services.usage.UsageMeter``) with a fake cgroup reader and clock, and
egress events sent again with their bytes (``corral.services.audit.record``), on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from corral.domain.clock import FakeClock
from corral.domain.ids import Prefix, new_id
from corral.domain.pricing import DEFAULT_PRICES
from corral.domain.usage import GIB, Reading
from corral.services import audit
from corral.services.lifecycle import Lifecycle
from corral.services.usage import UsageMeter, report
from corral.services.vms import ResourceLimits
from corral.store.db import transaction
from corral.store.tables import EgressEvent, User, Vm, VmUsageDay


class FakeReader:
    def __init__(self) -> None:
        self.readings: dict[str, Reading] = {}

    def read(self, cid: str) -> Reading | None:
        return self.readings.get(cid)


def _user_and_vm(sessions: sessionmaker[Session], now: datetime) -> tuple[str, str]:
    uid, vm_id = new_id(Prefix.USER), new_id(Prefix.VM)
    with transaction(sessions) as s:
        s.add(
            User(
                id=uid,
                first_name="U",
                last_name="Sage",
                email=f"{uid}@example.com",
                password_hash="x",
                created_at=now,
            )
        )
        s.flush()
        s.add(
            Vm(
                id=vm_id,
                user_id=uid,
                name=vm_id,
                public_key="k",
                status_detail="ready",
                image="debian:bookworm",
                vcpus=1,
                mem_mib=1024,
                disk_mib=1024,
                container_id=vm_id,
                created_at=now,
                updated_at=now,
            )
        )
    return uid, vm_id


def test_the_meter_keeps_totals_and_days_across_restarts(sessions: sessionmaker[Session]) -> None:
    clock = FakeClock(datetime(2026, 5, 1, 23, 59, 30, tzinfo=UTC))
    reader = FakeReader()
    uid, vm_id = _user_and_vm(sessions, clock.now())
    meter = UsageMeter(sessions, clock, reader)
    reader.readings[vm_id] = Reading(cpu_ns=7_000_000_000, mem_bytes=GIB, mem_peak_bytes=GIB)
    meter.begin(vm_id)
    assert vm_id in meter.running()
    clock.advance(60)  # across midnight
    reader.readings[vm_id] = Reading(9_000_000_000, GIB, 2 * GIB)
    meter.sample(vm_id)
    clock.advance(10)
    reader.readings[vm_id] = Reading(9_500_000_000, GIB, 2 * GIB)
    meter.end(vm_id)  # stopped
    clock.advance(1000)
    meter.sample(vm_id)  # not running: nothing added
    reader.readings[vm_id] = Reading(250_000_000, GIB // 2, GIB // 2)  # started again: a new cgroup
    meter.begin(vm_id)
    meter.begin(vm_id)  # already running: kept
    clock.advance(20)
    reader.readings[vm_id] = Reading(1_250_000_000, GIB // 2, GIB // 2)
    meter.end(vm_id)
    with sessions() as s:
        vm = s.get(Vm, vm_id)
        assert vm is not None
        assert vm.meter_at is None
        assert vm.uptime_ms == 90_000
        assert vm.mem_peak_bytes == 2 * GIB
        days = {row.day: row for row in s.scalars(select(VmUsageDay).where(VmUsageDay.vm_id == vm_id))}
    assert set(days) == {date(2026, 5, 1), date(2026, 5, 2)}
    assert sum(d.uptime_ms for d in days.values()) == 90_000
    assert days[date(2026, 5, 1)].uptime_ms == 30_000
    # 2 s + 0.5 s before the stop; after the restart, what the new cgroup used before it was ready (0.25 s,
    # the boot) is not counted, the 1 s after it is
    assert vm.cpu_us == 2_500_000 + 1_000_000
    assert sum(d.cpu_us for d in days.values()) == vm.cpu_us
    with sessions() as s:
        rep = report(s, uid, date(2026, 5, 1), date(2026, 5, 2), DEFAULT_PRICES, clock.now())
    assert sum(x.cpu_seconds for x in rep.lines) == 3.5
    # 70 s at 1 GiB + 20 s at 0.5 GiB
    assert round(sum(x.mem_gib_seconds for x in rep.lines), 6) == 80.0


def test_an_event_sent_again_gets_its_bytes(sessions: sessionmaker[Session]) -> None:
    now = datetime(2026, 5, 3, 12, tzinfo=UTC)
    uid, vm_id = _user_and_vm(sessions, now)
    ident = new_id(Prefix.EGRESS_EVENT)
    decided = audit.NewEvent(
        uid, now, vm_id, "example.org", None, "tls", "allowed", True, "enforce", id=ident
    )
    with transaction(sessions) as s:
        audit.record(s, [decided])
    with transaction(sessions) as s:
        audit.record(s, [audit.NewEvent(**{**decided.__dict__, "bytes_up": 10, "bytes_down": 20})])
    # decided and counted in one batch, plus one more event of the same connection's next request
    other = new_id(Prefix.EGRESS_EVENT)
    first = audit.NewEvent(uid, now, vm_id, "example.org", None, "http", "allowed", True, "enforce", id=other)
    with transaction(sessions) as s:
        audit.record(s, [first, audit.NewEvent(**{**first.__dict__, "bytes_up": 1, "bytes_down": 2})])
    with sessions() as s:
        rows = {
            r.id: (r.bytes_up, r.bytes_down, r.protocol)
            for r in s.scalars(select(EgressEvent).where(EgressEvent.vm_id == vm_id))
        }
    assert rows == {ident: (10, 20, "tls"), other: (1, 2, "http")}


class FakeNode:
    """What the lifecycle asks of the node when it stops and destroys: recorded, nothing on the host."""

    cgroup_parent = "corral-fake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def stop(self, cid: str) -> None:
        self.calls.append(("stop", cid))

    def destroy(self, cid: str) -> None:
        self.calls.append(("destroy", cid))


def test_expiry_destroys_what_it_can_and_retries_the_rest(sessions: sessionmaker[Session]) -> None:
    clock = FakeClock(datetime(2026, 5, 4, 12, tzinfo=UTC))
    node, reader = FakeNode(), FakeReader()
    life = Lifecycle(
        sessions,
        clock,
        node,  # type: ignore[arg-type]
        default_image="debian:bookworm",
        limits=ResourceLimits(),
        usage_reader=reader,
    )
    forgotten: list[tuple[str, str]] = []
    life.on_destroy = lambda cid, vm_id: forgotten.append((cid, vm_id))
    uid, ready = _user_and_vm(sessions, clock.now())
    ids = {"ready": ready}
    with transaction(sessions) as s:
        for state in ("stopped", "hibernated", "starting", "later", "destroyed"):
            vm_id = new_id(Prefix.VM)
            ids[state] = vm_id
            s.add(
                Vm(
                    id=vm_id,
                    user_id=uid,
                    name=vm_id,
                    public_key="k",
                    status_detail="ready" if state == "later" else state,
                    image="debian:bookworm",
                    vcpus=1,
                    mem_mib=1024,
                    disk_mib=1024,
                    container_id=vm_id,
                    created_at=clock.now(),
                    updated_at=clock.now(),
                )
            )
    reader.readings[ready] = Reading(1_000_000_000, GIB, GIB)
    life.meter.begin(ready)
    with transaction(sessions) as s:
        for state, vm_id in ids.items():
            row = s.get(Vm, vm_id)
            assert row is not None
            row.timeout = 5
            row.expires_at = clock.now() + (timedelta(hours=1) if state == "later" else timedelta(seconds=5))
    clock.advance(6)
    reader.readings[ready] = Reading(3_000_000_000, GIB, GIB)
    assert life.next_deadline() == datetime(2026, 5, 4, 12, 0, 5, tzinfo=UTC)
    assert life.expire_due() is True  # the starting VM is in the middle of an operation: again later
    with sessions() as s:
        rows = {state: s.get(Vm, vm_id) for state, vm_id in ids.items()}
    for state in ("ready", "stopped", "hibernated"):
        row = rows[state]
        assert row is not None
        assert (row.status_detail, row.destroy_reason, row.expires_at) == ("destroyed", "timeout", None), (
            state
        )
        assert row.destroyed_at == clock.now()
    expected = [
        ("stop", ready),
        ("destroy", ready),
        ("destroy", ids["stopped"]),
        ("destroy", ids["hibernated"]),
    ]
    assert sorted(node.calls) == sorted(expected)
    assert node.calls.index(("stop", ready)) < node.calls.index(("destroy", ready))
    assert (ids["hibernated"], ids["hibernated"]) in forgotten  # its saved memory is dropped too
    starting, later, destroyed = rows["starting"], rows["later"], rows["destroyed"]
    assert starting is not None
    assert starting.status_detail == "starting"
    assert later is not None
    assert later.status_detail == "ready"
    assert destroyed is not None
    assert destroyed.expires_at is None  # a destroyed VM's timer is cleared, nothing else happens to it
    ready_row = rows["ready"]
    assert ready_row is not None
    assert ready_row.cpu_us == 2_000_000  # read a last time before the stop
    assert life.next_deadline() == datetime(2026, 5, 4, 12, 0, 5, tzinfo=UTC)  # the starting one's, still due
    life.timers.close()
