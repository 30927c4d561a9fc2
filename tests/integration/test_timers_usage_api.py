"""The auto-destroy timer (``timeout`` on create, ``PATCH /v1/vms/{id}``), ``GET /v1/vms/history`` and
``GET /v1/usage`` against a node server: validation, 404/409, paging, and the usage figures and costs worked
out from rows written straight into the store (tests/sandbox/test_usage.py measures real sandboxes).

One node server for the module (no warm pool, no sandbox network: nothing here boots a sandbox; its
timer loop wakes every 0.5 s for the usage sample)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from corral.domain.ids import Prefix, new_id
from corral.domain.pricing import DEFAULT_PRICES
from corral.store.db import make_engine, session_factory, transaction
from corral.store.tables import EgressEvent, Vm, VmUsageDay
from tests.support import Account, Server, node_server, signup
from tests.vmtools import public_key, unique_name


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with node_server(
        tmp_path_factory.mktemp("timers"), CORRAL_NETWORK="off", CORRAL_USAGE_INTERVAL_S="0.5"
    ) as srv:
        yield srv


@pytest.fixture
def alice(node: Server) -> Iterator[Account]:
    acct = signup(node, first_name="Alice", last_name="Timer")
    yield acct
    acct.client.close()


@pytest.fixture
def bob(node: Server) -> Iterator[Account]:
    acct = signup(node, first_name="Bob", last_name="Timer")
    yield acct
    acct.client.close()


def write(node: Server, *rows: object) -> None:
    engine = make_engine(node.database_url)
    try:
        with transaction(session_factory(engine)) as session:
            for row in rows:
                session.add(row)
                session.flush()
    finally:
        engine.dispose()


def vm_row(owner: Account, status: str = "stopped", **fields: Any) -> Vm:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "id": new_id(Prefix.VM),
        "user_id": str(owner.user["id"]),
        "name": unique_name(),
        "public_key": public_key(),
        "status_detail": status,
        "image": "debian:bookworm",
        "vcpus": 1,
        "mem_mib": 1024,
        "disk_mib": 4096,
        "created_at": now,
        "updated_at": now,
        **fields,
    }
    return Vm(**values)


def error_code(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"].strip()
    code: str = body["error"]["code"]
    return code


def stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- the timer -------------------------------------------------------------------------------------------


def test_patch_sets_and_resets_the_timer(node: Server, alice: Account, bob: Account) -> None:
    vm = vm_row(alice)
    write(node, vm)
    c = alice.client
    # no timer yet, none given
    assert error_code(c.patch(f"/v1/vms/{vm.id}"), 400) == "vm_has_no_timeout"
    assert error_code(c.patch(f"/v1/vms/{vm.id}", json={}), 400) == "vm_has_no_timeout"
    for bad in (0, -5, 604801, "60", 1.5, True):
        assert error_code(c.patch(f"/v1/vms/{vm.id}", json={"timeout": bad}), 422) == "validation_error"
    assert error_code(c.patch(f"/v1/vms/{vm.id}", json={"ttl": 60}), 422) == "validation_error"
    before = datetime.now(UTC).replace(microsecond=0)
    resp = c.patch(f"/v1/vms/{vm.id}", json={"timeout": 3600})
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["id"] == vm.id
    assert got["timeout"] == 3600
    assert before + timedelta(seconds=3599) <= stamp(got["expires_at"]) <= before + timedelta(seconds=3602)
    # no body: the VM's own timeout again, from now
    again = c.patch(f"/v1/vms/{vm.id}").json()
    assert again["timeout"] == 3600
    assert again["expires_at"] >= got["expires_at"]
    shorter = c.patch(f"/v1/vms/{vm.id}", json={"timeout": 600}).json()
    assert shorter["timeout"] == 600
    assert shorter["expires_at"] < again["expires_at"]
    assert c.get(f"/v1/vms/{vm.id}").json()["expires_at"] == shorter["expires_at"]
    # not yours, unknown, malformed: 404 like every VM operation
    assert error_code(bob.client.patch(f"/v1/vms/{vm.id}", json={"timeout": 60}), 404) == "vm_not_found"
    assert error_code(c.patch(f"/v1/vms/{new_id(Prefix.VM)}", json={"timeout": 60}), 404) == "vm_not_found"
    assert error_code(c.patch("/v1/vms/nope", json={"timeout": 60}), 404) == "vm_not_found"


def test_patch_on_a_destroyed_vm_conflicts(node: Server, alice: Account) -> None:
    vm = vm_row(alice, "destroyed", timeout=60, destroyed_at=datetime.now(UTC), destroy_reason="api")
    write(node, vm)
    assert error_code(alice.client.patch(f"/v1/vms/{vm.id}", json={"timeout": 60}), 409) == "vm_destroyed"


def test_create_validates_the_timeout(alice: Account) -> None:
    for bad in (0, 604801, "10", 2.5):
        resp = alice.client.post(
            "/v1/vms", json={"name": unique_name(), "public_key": public_key(), "timeout": bad}
        )
        assert error_code(resp, 422) == "validation_error"
    assert alice.client.get("/v1/vms").json()["data"] == []


def test_a_timer_that_expired_while_nothing_ran_destroys_the_vm(node: Server, alice: Account) -> None:
    """A stopped VM without a sandbox, its deadline past, written by someone else (as if before a restart):
    the timer loop finds it at its next wake (the usage sample, every 0.5 s here) and destroys it."""
    past = datetime.now(UTC) - timedelta(seconds=5)
    vm = vm_row(alice, "stopped", timeout=1, expires_at=past)
    write(node, vm)
    got: dict[str, Any] = {}
    for _ in range(100):
        got = alice.client.get(f"/v1/vms/{vm.id}").json()
        if got["status"] == "destroyed":
            break
        time.sleep(0.05)
    assert got["status_detail"] == "destroyed", got
    assert got["destroy_reason"] == "timeout"
    assert got["expires_at"] is None
    assert got["destroyed_at"] is not None


# --- history ---------------------------------------------------------------------------------------------


def test_history_lists_destroyed_vms_newest_first_in_pages(
    node: Server, alice: Account, bob: Account
) -> None:
    start = datetime.now(UTC) - timedelta(hours=2)
    gone = [
        vm_row(
            alice,
            "destroyed",
            created_at=start,
            updated_at=start + timedelta(minutes=n),
            destroyed_at=start + timedelta(minutes=n),
            destroy_reason="timeout" if n % 2 else "api",
            cpu_us=1_500_000 * n,
            mem_peak_bytes=1000 * n,
            uptime_ms=60_000 * n,
        )
        for n in range(1, 6)
    ]
    live = vm_row(alice, "stopped")
    write(node, *gone, live)
    c = alice.client
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        resp = c.get("/v1/vms/history", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {"data", "has_more", "cursor"}
        assert len(body["data"]) <= 2
        seen += body["data"]
        pages += 1
        if not body["has_more"]:
            assert body["cursor"] is None
            break
        cursor = body["cursor"]
    assert pages == 3
    assert [vm["id"] for vm in seen] == [vm.id for vm in reversed(gone)]
    first = seen[0]
    assert first["status"] == "destroyed"
    assert first["destroy_reason"] == "timeout"
    assert (first["cpu_ms"], first["mem_peak_bytes"], first["uptime_ms"]) == (7500, 5000, 300_000)
    # its cost: 5 minutes of 4 GiB of disk (nothing else was measured for it)
    disk_hours = 4 * (5 / 60)
    assert first["cost_cents"] == pytest.approx(disk_hours * DEFAULT_PRICES.disk_gib_hour_cents, abs=1e-6)
    asc = c.get("/v1/vms/history", params={"order": "asc", "sort": "created_at", "limit": 100}).json()
    assert {vm["id"] for vm in asc["data"]} == {vm.id for vm in gone}
    assert bob.client.get("/v1/vms/history").json() == {"data": [], "has_more": False, "cursor": None}
    assert error_code(c.get("/v1/vms/history", params={"cursor": "garbage"}), 400) == "invalid_cursor"
    assert error_code(c.get("/v1/vms/history", params={"sort": "name"}), 400) == "invalid_parameter"
    assert error_code(c.get("/v1/vms/history", params={"limit": 101}), 400) == "invalid_parameter"


# --- usage -----------------------------------------------------------------------------------------------


def test_usage_rolls_up_per_day_and_vm_with_costs(node: Server, alice: Account, bob: Account) -> None:
    """A VM that lived from 18:00 on one day to 06:00 on the next, with measured rows and egress on both."""
    d1, d2 = date(2026, 3, 9), date(2026, 3, 10)
    created = datetime(2026, 3, 9, 18, 0, tzinfo=UTC)
    ended = datetime(2026, 3, 10, 6, 0, tzinfo=UTC)
    vm = vm_row(alice, "destroyed", disk_mib=2048, created_at=created, updated_at=ended, destroyed_at=ended)
    uid = str(alice.user["id"])
    gib_ms_in_kib = 1024 * 1024 * 1000  # one GiB-second, in KiB-ms
    rows: list[object] = [
        vm,
        VmUsageDay(
            vm_id=vm.id, day=d1, user_id=uid, cpu_us=3_000_000, mem_kib_ms=10 * gib_ms_in_kib, uptime_ms=1
        ),
        VmUsageDay(vm_id=vm.id, day=d2, user_id=uid, cpu_us=500_000, mem_kib_ms=gib_ms_in_kib, uptime_ms=1),
    ]
    for at, up, down in ((created + timedelta(hours=1), 100, 1000), (ended - timedelta(hours=1), 24, 2**30)):
        rows.append(
            EgressEvent(
                id=new_id(Prefix.EGRESS_EVENT),
                user_id=uid,
                timestamp=at,
                vm_id=vm.id,
                host="example.org",
                protocol="http",
                verdict="allowed",
                allowed=True,
                mode="enforce",
                bytes_up=up,
                bytes_down=down,
            )
        )
    write(node, *rows)
    c = alice.client
    resp = c.get("/v1/usage", params={"from": "2026-03-01", "to": "2026-03-31"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["from"] == "2026-03-01"
    assert body["to"] == "2026-03-31"
    assert body["prices"] == {
        "cpu_second_cents": DEFAULT_PRICES.cpu_second_cents,
        "mem_gib_second_cents": DEFAULT_PRICES.mem_gib_second_cents,
        "disk_gib_hour_cents": DEFAULT_PRICES.disk_gib_hour_cents,
        "egress_gib_cents": DEFAULT_PRICES.egress_gib_cents,
    }
    lines = body["data"]
    assert [(x["date"], x["vm_id"], x["vm_name"]) for x in lines] == [
        ("2026-03-09", vm.id, vm.name),
        ("2026-03-10", vm.id, vm.name),
    ]
    expect = [(3.0, 10.0, 12.0, 1100), (0.5, 1.0, 12.0, 24 + 2**30)]  # disk: 2 GiB x 6 h each day
    p = DEFAULT_PRICES
    for line, (cpu, mem, disk, egress) in zip(lines, expect, strict=True):
        assert (line["cpu_seconds"], line["mem_gib_seconds"], line["disk_gib_hours"]) == (cpu, mem, disk)
        assert line["egress_bytes"] == egress
        cost = (
            cpu * p.cpu_second_cents
            + mem * p.mem_gib_second_cents
            + disk * p.disk_gib_hour_cents
            + egress / 2**30 * p.egress_gib_cents
        )
        assert line["cost_cents"] == pytest.approx(cost, abs=1e-6)
    total = body["total"]
    for key in ("cpu_seconds", "mem_gib_seconds", "disk_gib_hours", "egress_bytes", "cost_cents"):
        assert total[key] == pytest.approx(sum(x[key] for x in lines), abs=1e-9), key
    assert round(total["cost_cents"] * 1e6) == sum(round(x["cost_cents"] * 1e6) for x in lines)
    # one day, one VM, someone else
    one = c.get("/v1/usage", params={"from": "2026-03-10", "to": "2026-03-10", "vm_id": vm.id}).json()
    assert [x["date"] for x in one["data"]] == ["2026-03-10"]
    other = c.get("/v1/usage", params={"from": "2026-03-01", "to": "2026-03-31", "vm_id": "vm_other"}).json()
    assert other["data"] == []
    assert other["total"]["cost_cents"] == 0
    theirs = bob.client.get("/v1/usage", params={"from": "2026-03-01", "to": "2026-03-31"}).json()
    assert theirs["data"] == []


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"from": "2026-03-01"},
        {"to": "2026-03-01"},
        {"from": "2026-3-1", "to": "2026-03-02"},
        {"from": "2026-02-30", "to": "2026-03-02"},
        {"from": "yesterday", "to": "2026-03-02"},
        {"from": "2026-03-02", "to": "2026-03-01"},
        {"from": "2025-01-01", "to": "2026-01-02"},
    ],
)
def test_usage_rejects_bad_ranges(alice: Account, params: dict[str, str]) -> None:
    assert error_code(alice.client.get("/v1/usage", params=params), 400) == "invalid_parameter"


def test_usage_accepts_a_full_leap_year(alice: Account) -> None:
    resp = alice.client.get("/v1/usage", params={"from": "2028-01-01", "to": "2028-12-31"})
    assert resp.status_code == 200, resp.text
