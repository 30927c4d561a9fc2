"""Node capacity and quotas on the real kernel (issue 13, findings 9 and 14), on a small node: its data
directory is a 1.5 GiB tmpfs (the pool is sized from it), the sandboxes' parent memory cgroup is 384 MiB.

- a VM filling its own quota and another filling what is left of the pool leave the pool writable, the other
  VMs working and create/destroy answering; a create that does not fit is refused with 503 ``node_full``;
- a memory hog in one VM is held by the parent cgroup, and the API answers within 1 s throughout;
- an account over its quota is refused with 409 ``quota_exceeded``; a destroyed VM frees its share;
- GET /v1/node shows capacity, committed and used consistent with the VMs (operators only).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Account, Server, node_server, reset_node, signup, wait_until
from tests.vmtools import create_ready, destroy, public_key, run, unique_name, wait_detail

MIB = 1 << 20
TMPFS_MIB = 1536
SETTINGS = {
    "CORRAL_NETWORK": "off",
    "CORRAL_DISK_RESERVE_MIB": "256",  # pool = 1536 - 256 MiB; parent qgroup = pool - 256 MiB = 1024 MiB
    "CORRAL_OVERCOMMIT_DISK": "2",  # quotas may add up to twice the pool: the parent qgroup holds them
    "CORRAL_NODE_MEM_MIB": "384",
    "CORRAL_OVERCOMMIT_MEM": "8",
    "CORRAL_QUOTA_MEM_MIB": "2048",
    "CORRAL_DISK_WATCH_S": "0.5",
}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A node server whose data directory (``CORRAL_DATA_DIR``: ``Server.data_dir`` is replaced) is a
    small tmpfs."""
    data = Path(tempfile.mkdtemp(prefix="corral-cap-", dir="/tmp"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m,mode=0711", "tmpfs", str(data)], check=True
    )
    try:
        with node_server(tmp_path_factory.mktemp("cap"), CORRAL_DATA_DIR=str(data), **SETTINGS) as srv:
            srv.data_dir = data
            yield srv
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            reset_node(data, {"CORRAL_NETWORK": "off"})
        subprocess.run(["umount", "-l", str(data)], check=False)
        data.rmdir()


@pytest.fixture(scope="module")
def operator(small: Server) -> Iterator[Account]:
    acct = signup(small)  # the first user: the operator when CORRAL_OPERATOR_EMAILS is not set
    yield acct
    acct.client.close()


def _pool_mount(data: Path) -> list[str]:
    return [
        line for line in Path("/proc/self/mounts").read_text().splitlines() if f"{data}/node/disk " in line
    ]


def _node(acct: Account) -> dict[str, Any]:
    resp = acct.client.get("/v1/node")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def test_the_pool_follows_the_hosts_free_space(small: Server, operator: Account) -> None:
    """Something else fills the data dir's filesystem while the node runs: the sandboxes' limit comes down
    with it, so a VM writing within its quota meets EDQUOT instead of the loop device meeting ENOSPC."""
    c = operator.client
    vm = create_ready(c, disk_mib=1024, mem_mib=64)
    ballast = small.data_dir / "ballast"
    start = _node(operator)["used"]["disk_limit_bytes"]
    try:
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={ballast}", "bs=1M", "count=700"], check=True, capture_output=True
        )
        wait_until(lambda: _node(operator)["used"]["disk_limit_bytes"] <= start - 500 * MIB, timeout=30)
        out = run(c, vm["id"], "dd if=/dev/zero of=/root/big bs=1M count=900; sync", timeout=120)
        assert "Disk quota exceeded" in out["stderr"], out
        mounted = _pool_mount(small.data_dir)
        assert mounted, "the pool is not mounted"
        assert all(" rw," in line for line in mounted), mounted
        assert run(c, vm["id"], "rm /root/big; sync; echo ok")["stdout"] == "ok\n"
    finally:
        ballast.unlink(missing_ok=True)
    wait_until(lambda: _node(operator)["used"]["disk_limit_bytes"] >= start - 16 * MIB, timeout=30)
    destroy(c, vm["id"])


def test_filling_a_quota_and_the_pool_leaves_it_writable(small: Server, operator: Account) -> None:
    c = operator.client
    node = _node(operator)
    assert node["capacity"]["disk_mib"] <= TMPFS_MIB - 2 * 256  # below the pool, below the host's free space
    other = create_ready(c, disk_mib=128, mem_mib=64)
    filler = create_ready(c, disk_mib=512, mem_mib=64)
    hog = create_ready(c, disk_mib=1400, mem_mib=64)
    try:
        # the first fills its own quota, the second what is left of the pool
        full = run(c, filler["id"], "dd if=/dev/zero of=/root/big bs=1M count=600; sync", timeout=120)
        assert "Disk quota exceeded" in full["stderr"], full
        over = run(c, hog["id"], "dd if=/dev/zero of=/root/big bs=1M count=1400; sync", timeout=120)
        assert "Disk quota exceeded" in over["stderr"], over
        used = _node(operator)["used"]
        assert used["disk_bytes"] <= used["disk_limit_bytes"]
        # the pool is still read-write: nothing forced it read-only
        mounted = _pool_mount(small.data_dir)
        assert mounted, "the pool is not mounted"
        assert all(" rw," in line for line in mounted), mounted
        # the others still answer (while the pool is full, their writes fail with EDQUOT too: the price of
        # an overcommit ratio above 1); once space is freed, they read and write again
        run(c, other["id"], "cat /etc/hostname")
        assert run(c, hog["id"], "rm /root/big; sync")["exit_code"] == 0
        alive = run(c, other["id"], "cat /etc/hostname")
        assert alive["exit_code"] == 0, alive
        wrote = run(c, other["id"], "echo still > /root/f && sync && cat /root/f")
        assert (wrote["exit_code"], wrote["stdout"]) == (0, "still\n"), wrote
        # a create that does not fit is refused with what is short; one that fits comes up
        resp = c.post("/v1/vms", json={"name": unique_name(), "public_key": public_key(), "disk_mib": 2048})
        assert resp.status_code == 503, resp.text
        error = resp.json()["error"]
        assert error["code"] == "node_full", error
        assert "disk" in error["message"], error
        # destroy answers, also for a VM at its own quota (the delete lifts it), and frees room for a create
        destroy(c, filler["id"])
        fresh = create_ready(c, disk_mib=64, mem_mib=64)
        assert run(c, fresh["id"], "echo ok > /root/ok && cat /root/ok")["stdout"] == "ok\n"
        destroy(c, fresh["id"])
    finally:
        for vm in (other, filler, hog):
            destroy(c, vm["id"])
    # what the destroyed VMs held is no longer counted (a delete the kernel did not account would stay counted
    # for good, and the pool would look fuller with every big VM destroyed)
    wait_until(lambda: _node(operator)["used"]["disk_bytes"] < 64 * MIB, timeout=30)


def test_a_memory_hog_is_held_by_the_parent_cgroup(small: Server, operator: Account) -> None:
    c = operator.client
    vm = create_ready(c, mem_mib=1024, disk_mib=64)  # the VM may use 1 GiB; all sandboxes together 384 MiB
    slow: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=small.url, timeout=5.0) as probe:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    ok = probe.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                took = time.monotonic() - started
                if not ok or took > 1.0:
                    slow.append(took)
                time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        hog = run(c, vm["id"], "dd if=/dev/zero of=/dev/null bs=700M count=2", timeout=120)
        node = _node(operator)
    finally:
        stop.set()
        watcher.join()
        destroy(c, vm["id"])
    assert hog["exit_code"] != 0, hog  # killed: 700 MiB fit the VM's own limit, not its parent's
    assert node["capacity"]["mem_mib"] == 384
    assert node["used"]["mem_limit_bytes"] == 384 * MIB
    assert not slow, slow


def test_quota_refuses_then_frees(small: Server, operator: Account) -> None:
    acct = signup(small, first_name="Quinn")
    try:
        c = acct.client
        big = create_ready(c, mem_mib=1536, disk_mib=64)
        body = {"name": unique_name(), "public_key": public_key(), "mem_mib": 1024, "disk_mib": 64}
        resp = c.post("/v1/vms", json=body)
        assert resp.status_code == 409, resp.text
        error = resp.json()["error"]
        assert error["code"] == "quota_exceeded", error
        assert "memory 1536 MiB in use + 1024 MiB asked > limit 2048 MiB" in error["message"], error
        # another account is not held by this one's quota
        mine = create_ready(operator.client, mem_mib=1024, disk_mib=64)
        destroy(operator.client, mine["id"])
        # fork children count like creates: refused, the source runs on
        forked = c.post(f"/v1/vms/{big['id']}/fork", json={"count": 1}, timeout=120)
        assert forked.status_code == 409, forked.text
        assert forked.json()["error"]["code"] == "quota_exceeded"
        assert run(c, big["id"], "echo alive")["stdout"] == "alive\n"
        assert c.get("/v1/vms", params={"limit": 100}).json()["data"] == [
            c.get(f"/v1/vms/{big['id']}").json()
        ]
        # a stopped VM still holds its share; a destroyed one does not
        assert c.post(f"/v1/vms/{big['id']}/stop").status_code == 200
        assert c.post("/v1/vms", json=body).status_code == 409
        destroy(c, big["id"])
        resp = c.post("/v1/vms", json=body)
        assert resp.status_code == 201, resp.text
        assert wait_detail(c, resp.json()["id"])["status_detail"] == "ready"
        destroy(c, resp.json()["id"])
    finally:
        acct.client.close()


def test_node_shows_capacity_committed_and_used(small: Server, operator: Account) -> None:
    stranger = signup(small, first_name="Eve")
    made: list[tuple[Account, str]] = []
    try:
        before = _node(operator)
        made.append((stranger, create_ready(stranger.client, vcpus=1, mem_mib=96, disk_mib=160)["id"]))
        made.append((operator, create_ready(operator.client, vcpus=2, mem_mib=64, disk_mib=96)["id"]))
        run(operator.client, made[1][1], "dd if=/dev/zero of=/root/f bs=1M count=40; sync")
        # btrfs accounts a qgroup's bytes when its transaction commits
        grown = before["used"]["disk_bytes"] + 40 * MIB
        wait_until(lambda: _node(operator)["used"]["disk_bytes"] >= grown, timeout=30)
        after = _node(operator)
        refused = stranger.client.get("/v1/node")
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "forbidden", refused.text
    finally:
        for acct, vm_id in made:
            destroy(acct.client, vm_id)
        stranger.client.close()
    delta = {
        k: after["committed"][k] - before["committed"][k] for k in ("vms", "vcpus", "mem_mib", "disk_mib")
    }
    assert delta == {"vms": 2, "vcpus": 3, "mem_mib": 160, "disk_mib": 256}, (before, after)
    assert after["capacity"]["mem_mib"] == 384
    assert after["overcommit"]["mem"] == 8
    assert after["admittable"]["disk_mib"] == after["capacity"]["disk_mib"] * 2
    assert 0 < after["used"]["mem_bytes"] <= after["used"]["mem_limit_bytes"] == 384 * MIB
    assert after["used"]["pool_size_bytes"] <= (TMPFS_MIB - 256) * MIB
    assert _node(operator)["committed"]["vms"] == before["committed"]["vms"]
    # the operator's CLI shows the same figures
    env = {**os.environ, "CORRAL_URL": small.url, "CORRAL_API_KEY": operator.token, "COLUMNS": "200"}
    shown = subprocess.run(
        [sys.executable, "-m", "corral", "node", "show"], env=env, capture_output=True, text=True, check=True
    )
    assert f"node {after['id']}:" in shown.stdout, shown.stdout
    assert str(after["capacity"]["disk_mib"]) in shown.stdout, shown.stdout
