"""Auto-destroy and accounting on real sandboxes (the session's node server): a VM with ``timeout: 2`` is
stopped and destroyed after about 2 s with nothing left on the host, one whose timer is reset keeps
running until it is left alone, a hibernated one loses its capture too; what a VM used (CPU, peak memory,
uptime, bytes through the egress proxy) is measured from its cgroup and the proxy, and the history and the
usage report agree with each other and with the price table."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from corral.domain.pricing import DEFAULT_PRICES
from tests.support import Account, Server, node_host, signup
from tests.vmtools import create_ready, destroy, host_leftovers, public_key, run, unique_name

MIB = 1024 * 1024


def node_root(srv: Server) -> Path:
    return srv.data_dir / "node"


def node_id(srv: Server) -> str:
    return (node_root(srv) / "node-id").read_text().strip()


def poll(
    get: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool], within: float
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        got = get()
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def vm_of(c: httpx.Client, vm_id: str) -> dict[str, Any]:
    got: dict[str, Any] = c.get(f"/v1/vms/{vm_id}").json()
    return got


def create(c: httpx.Client, **fields: Any) -> dict[str, Any]:
    resp = c.post("/v1/vms", json={"name": unique_name(), "public_key": public_key(), **fields})
    assert resp.status_code == 201, resp.text
    got: dict[str, Any] = resp.json()
    return got


def test_timers_destroy_vms_unless_reset(node: Server, owner: Account) -> None:
    c = owner.client
    kept = create(c, timeout=2)  # reset every second below
    started = time.monotonic()
    short = create(c, timeout=2)
    assert short["timeout"] == 2
    assert short["expires_at"] is not None
    stop = threading.Event()

    def keep_alive() -> None:
        with node.client(owner.token) as mine:
            while not stop.wait(1.0):
                assert mine.patch(f"/v1/vms/{kept['id']}").status_code == 200

    patcher = threading.Thread(target=keep_alive)
    patcher.start()
    try:
        gone = poll(lambda: vm_of(c, short["id"]), lambda v: v["status_detail"] == "destroyed", 6.0)
        took = time.monotonic() - started
        assert gone["status_detail"] == "destroyed", gone
        assert gone["destroy_reason"] == "timeout"
        assert gone["expires_at"] is None
        assert 1.5 <= took <= 6.0, took
        left = host_leftovers(node_root(node), node_id(node))
        assert all(short["id"] not in found for found in left.values()), left
        # the other one: still running after twice its timeout
        while time.monotonic() - started < 4.5:
            time.sleep(0.1)
        alive = vm_of(c, kept["id"])
        assert alive["status_detail"] == "ready", alive
    finally:
        stop.set()
        patcher.join()
    left_alone = time.monotonic()
    gone = poll(lambda: vm_of(c, kept["id"]), lambda v: v["status_detail"] == "destroyed", 5.0)
    assert gone["destroy_reason"] == "timeout", gone
    assert 1.0 <= time.monotonic() - left_alone <= 5.0


def test_an_expired_hibernated_vm_loses_its_capture(node: Server, owner: Account) -> None:
    c = owner.client
    vm = create_ready(c, timeout=600)
    assert c.post(f"/v1/vms/{vm['id']}/hibernate").status_code == 200
    states = node_root(node) / "disk" / "states"
    assert (states / f"hib-{vm['id']}").exists()
    assert c.patch(f"/v1/vms/{vm['id']}", json={"timeout": 1}).json()["timeout"] == 1
    gone = poll(lambda: vm_of(c, vm["id"]), lambda v: v["status_detail"] == "destroyed", 5.0)
    assert gone["destroy_reason"] == "timeout", gone
    assert not (states / f"hib-{vm['id']}").exists()
    assert not (node_root(node) / "disk" / "vols" / vm["id"]).exists()


def test_what_a_vm_used_is_measured_and_priced(node: Server, owner: Account) -> None:
    c = owner.client
    # a pooled create (the default shape) and a cold one (another memory size): both measure create_ms
    busy = create_ready(c, egress={"rules": [{"host": "allowed.test"}]})
    ready_at = time.monotonic()
    idle = create_ready(c, mem_mib=512)
    assert isinstance(busy["create_ms"], int)
    assert busy["create_ms"] >= 0
    assert isinstance(idle["create_ms"], int)
    assert idle["create_ms"] > 0
    assert run(c, busy["id"], "timeout 1 sh -c 'while :; do :; done'; echo done")["stdout"] == "done\n"
    # 64 MiB in one buffer, filled
    assert (
        run(c, busy["id"], "dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null; echo ok")["stdout"]
        == "ok\n"
    )
    got = run(
        c, busy["id"], "curl -sS -m 10 -o /dev/null -w '%{size_download}' http://allowed.test/bytes/1000000"
    )
    assert got["stdout"] == "1000000", got
    for vm in (busy, idle):
        assert c.post(f"/v1/vms/{vm['id']}/stop").status_code == 200
    ran_for_ms = (time.monotonic() - ready_at) * 1000
    for vm in (busy, idle):
        destroy(c, vm["id"])
    history = {vm["id"]: vm for vm in c.get("/v1/vms/history", params={"limit": 100}).json()["data"]}
    b, i = history[busy["id"]], history[idle["id"]]
    assert b["destroy_reason"] == "api"
    assert b["cpu_ms"] >= 700, b
    assert i["cpu_ms"] < 300, i
    assert b["mem_peak_bytes"] >= 64 * MIB, b
    assert b["uptime_ms"] <= ran_for_ms + 500, (b, ran_for_ms)
    assert b["uptime_ms"] >= ran_for_ms - 1500, (b, ran_for_ms)
    assert i["uptime_ms"] < b["uptime_ms"]

    # the usage report (from yesterday, should the test cross midnight), once the proxy's bytes are in
    today = datetime.now(UTC).date()
    params = {"from": (today - timedelta(days=1)).isoformat(), "to": today.isoformat()}

    def lines_of(vm_id: str) -> dict[str, Any]:
        rep = c.get("/v1/usage", params={**params, "vm_id": vm_id})
        assert rep.status_code == 200, rep.text
        body: dict[str, Any] = rep.json()
        return body

    rep = poll(lambda: lines_of(busy["id"]), lambda r: r["total"]["egress_bytes"] >= 1_000_000, 5.0)
    total = rep["total"]
    assert 1_000_000 <= total["egress_bytes"] <= 1_000_000 + 64 * 1024, total  # the body and its headers
    assert abs(total["cpu_seconds"] - b["cpu_ms"] / 1000) < 0.002, (total, b)
    assert total["mem_gib_seconds"] > 0
    assert total["disk_gib_hours"] > 0
    p = DEFAULT_PRICES
    for line in rep["data"]:
        cost = (
            line["cpu_seconds"] * p.cpu_second_cents
            + line["mem_gib_seconds"] * p.mem_gib_second_cents
            + line["disk_gib_hours"] * p.disk_gib_hour_cents
            + line["egress_bytes"] / 2**30 * p.egress_gib_cents
        )
        assert abs(line["cost_cents"] - cost) <= 2e-6, line
    # the history's cost, now that the proxy's bytes are in, is the report's
    again = {vm["id"]: vm for vm in c.get("/v1/vms/history", params={"limit": 100}).json()["data"]}
    assert abs(again[busy["id"]]["cost_cents"] - total["cost_cents"]) <= 1e-6, (again[busy["id"]], total)
    everything = c.get("/v1/usage", params=params).json()
    assert {line["vm_id"] for line in everything["data"]} >= {busy["id"], idle["id"]}
    idle_cpu = sum(x["cpu_seconds"] for x in everything["data"] if x["vm_id"] == idle["id"])
    assert abs(idle_cpu - i["cpu_ms"] / 1000) < 0.002


def test_timers_and_meters_survive_a_server_crash(tmp_path: Path) -> None:
    """``corral serve`` killed (SIGKILL) while a VM's timer runs and another VM runs without one: the timer
    fires while the server is down, so the VM is destroyed as the server starts again; the other VM's
    meter runs on, so its uptime covers the time the server was down."""
    with node_host(tmp_path, CORRAL_NETWORK="off") as host:
        server = host.start()
        acct = signup(server)
        timed = create_ready(acct.client, timeout=2)
        running = create_ready(acct.client)
        running_since = time.monotonic()
        host.kill()
        time.sleep(2.5)
        server = host.start()
        with server.client(acct.token) as c:
            gone = poll(lambda: vm_of(c, timed["id"]), lambda v: v["status_detail"] == "destroyed", 5.0)
            assert gone["destroy_reason"] == "timeout", gone
            left = host_leftovers(host.data_dir / "node", host.node_id)
            assert all(timed["id"] not in found for found in left.values()), left
            assert c.post(f"/v1/vms/{running['id']}/stop").status_code == 200
            ran_ms = (time.monotonic() - running_since) * 1000
            stopped = vm_of(c, running["id"])
            assert ran_ms - 1500 <= stopped["uptime_ms"] <= ran_ms + 500, (stopped, ran_ms)
            destroy(c, running["id"])
