"""Reconciliation with real servers: ``corral serve`` killed with SIGKILL and started again on the same data
dir and database adopts what still runs, fails what was lost, finishes interrupted operations and removes
everything no record owns; a kill at any moment of a create, stop, start or destroy leaves no VM stuck and
nothing on the host once the VMs are destroyed; fifty sandboxes at once leave nothing behind either."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from corral.store.db import normalise_url
from tests.support import NodeHost, node_host, signup
from tests.vmtools import (
    cgroup_parents,
    create_ready,
    destroy,
    host_leftovers,
    netns_names,
    public_key,
    run,
    sandbox_pid_of,
    unique_name,
    wait_detail,
)

SETTLED = ("ready", "failed", "stopped", "destroyed")  # no VM may stay in a transitional state after a start
BACKGROUND = "nohup setsid sleep 1000 >/dev/null 2>&1 &"
# after the request is sent; here a POST /v1/vms is answered in ~20 ms and the cold boot takes ~70 ms more, a
# stop or a destroy ~25 ms
KILL_DELAYS_MS = (0, 2, 5, 10, 15, 20, 30, 40, 60, 80)
LATER_IN_A_BOOT_MS = (100, 120, 140, 160, 200, 240)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[NodeHost]:
    with node_host(tmp_path) as h:
        yield h


def client(host: NodeHost, token: str, timeout: float = 60.0) -> httpx.Client:
    assert host.server is not None
    return httpx.Client(
        base_url=host.server.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
    )


def logs(host: NodeHost) -> str:
    """The servers' logs (the end), for assertion messages."""
    return "\nserver logs:\n" + host.log_text()[-6000:]


def container_state(host: NodeHost, cid: str) -> dict[str, Any] | None:
    """``crun state`` of a container of the node, or None when there is no such container."""
    out = subprocess.run(
        ["crun", "--root", str(host.node_root / "state"), "state", cid], capture_output=True, text=True
    )
    if out.returncode != 0:
        return None
    state: dict[str, Any] = json.loads(out.stdout)
    return state


def container_pid(host: NodeHost, cid: str) -> int | None:
    pid = (container_state(host, cid) or {}).get("pid")
    return pid if isinstance(pid, int) and pid > 0 else None


def recorded_vm_ids(host: NodeHost) -> set[str]:
    """The ids of every VM in the node's database, read directly."""
    engine = create_engine(normalise_url(host.database_url))
    try:
        with engine.connect() as conn:
            return {str(row[0]) for row in conn.execute(text("SELECT id FROM vms"))}
    finally:
        engine.dispose()


def start_background_sleep(host: NodeHost, c: httpx.Client, vm_id: str) -> int:
    """Start ``sleep 1000`` in its own session inside the VM; its host PID."""
    assert run(c, vm_id, BACKGROUND)["exit_code"] == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pid = sandbox_pid_of(host.node_root, host.node_id, vm_id, "sleep 1000")
        if pid is not None:
            return pid
        time.sleep(0.05)
    raise AssertionError(f"no background sleep in {vm_id}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_nothing_left(host: NodeHost, keep: Collection[str] = ()) -> None:
    left = host_leftovers(host.node_root, host.node_id)
    expected = {kind: set(keep) for kind in left}
    assert left == expected, f"left on the host: {left}, expected only {sorted(keep)}" + logs(host)


def all_vms(c: httpx.Client) -> list[dict[str, Any]]:
    resp = c.get("/v1/vms", params={"limit": 100})
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()["data"]
    assert not resp.json()["has_more"]
    return data


# ---- adoption -----------------------------------------------------------------------------------------------


def test_a_running_vm_is_adopted_with_its_processes_and_files(host: NodeHost) -> None:
    srv = host.start()
    token = signup(srv).token
    with client(host, token) as c:
        vm_id = create_ready(c)["id"]
        assert run(c, vm_id, "echo kept > /root/marker")["exit_code"] == 0
        sleeper = start_background_sleep(host, c, vm_id)
        init = container_pid(host, vm_id)
        assert init is not None

    host.kill()
    assert alive(sleeper), "killing the server must not kill the sandbox's processes"
    host.start()

    with client(host, token) as c:
        vm = c.get(f"/v1/vms/{vm_id}").json()
        assert (vm["status"], vm["status_detail"]) == ("running", "ready"), str(vm) + logs(host)
        assert vm["failure_reason"] is None
        assert container_pid(host, vm_id) == init, "the sandbox must not have been booted again"
        assert alive(sleeper)
        assert sandbox_pid_of(host.node_root, host.node_id, vm_id, "sleep 1000") == sleeper
        out = run(c, vm_id, "cat /root/marker")
        assert (out["exit_code"], out["stdout"]) == (0, "kept\n"), out
        inside = run(
            c,
            vm_id,
            r"for p in /proc/[0-9]*; do tr '\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^sleep 1000'",
        )
        assert inside["stdout"] == "1\n", inside
        assert_nothing_left(host, keep={vm_id})

        # the adopted VM is a VM like any other: stop and start it, then destroy it
        assert c.post(f"/v1/vms/{vm_id}/stop").json()["status_detail"] == "stopped"
        assert not alive(sleeper)
        assert c.post(f"/v1/vms/{vm_id}/start").json()["status_detail"] == "ready"
        assert run(c, vm_id, "cat /root/marker")["stdout"] == "kept\n"
        destroy(c, vm_id)
        assert c.get(f"/v1/vms/{vm_id}").json()["status"] == "destroyed"
    assert_nothing_left(host)


def test_a_vm_killed_between_running_and_ready_is_ready_after_adoption(host: NodeHost) -> None:
    """A cold boot moves the record starting -> running -> ready in two transactions; a kill between them
    leaves ``running``/``running`` in the store with the sandbox up. The restarted server adopts it: it must
    end ``ready`` (clients poll for ``ready``), not stay ``running`` for good."""
    srv = host.start()
    token = signup(srv).token
    with client(host, token) as c:
        vm_id = create_ready(c)["id"]
    host.kill()
    set_detail(host, vm_id, "running")  # the store as that kill leaves it (the sandbox runs)
    host.start()
    with client(host, token) as c:
        vm = wait_detail(c, vm_id, timeout=10)
        assert run(c, vm_id, "echo $((6*7))")["stdout"] == "42\n"
        assert vm["status_detail"] == "ready", str(vm) + logs(host)
        destroy(c, vm_id)
    assert_nothing_left(host)


def set_detail(host: NodeHost, vm_id: str, detail: str) -> None:
    engine = create_engine(normalise_url(host.database_url))
    try:
        with engine.begin() as conn:
            done = conn.execute(
                text("UPDATE vms SET status_detail = :detail WHERE id = :id"), {"detail": detail, "id": vm_id}
            )
            assert done.rowcount == 1
    finally:
        engine.dispose()


# ---- lost -------------------------------------------------------------------------------------------------


def test_a_vm_lost_while_the_server_was_down_is_failed_and_can_be_destroyed(host: NodeHost) -> None:
    srv = host.start()
    token = signup(srv).token
    with client(host, token) as c:
        lost = create_ready(c)["id"]
        sleeper = start_background_sleep(host, c, lost)
        stopped = create_ready(c)["id"]
        assert run(c, stopped, "echo on-disk > /root/marker")["exit_code"] == 0
        assert c.post(f"/v1/vms/{stopped}/stop").json()["status_detail"] == "stopped"

    host.kill()
    subprocess.run(
        ["crun", "--root", str(host.node_root / "state"), "delete", "--force", lost],
        check=True,
        capture_output=True,
    )
    assert not alive(sleeper)
    host.start()

    with client(host, token) as c:
        vm = c.get(f"/v1/vms/{lost}").json()
        assert (vm["status"], vm["status_detail"]) == ("failed", "failed"), str(vm) + logs(host)
        assert vm["failure_reason"], vm
        # what was left of it (mount, cgroups, bundle) is gone already; its disk stays until destroy
        left = host_leftovers(host.node_root, host.node_id)
        assert lost not in left["containers"] | left["mounts"] | left["cgroups"] | left["processes"], left
        resp = c.delete(f"/v1/vms/{lost}")
        assert resp.status_code == 204, resp.text + logs(host)
        assert c.get(f"/v1/vms/{lost}").json()["status_detail"] == "destroyed"

        # a VM that was stopped stays stopped, with its disk
        vm = c.get(f"/v1/vms/{stopped}").json()
        assert vm["status_detail"] == "stopped", vm
    left = host_leftovers(host.node_root, host.node_id)
    assert left["volumes"] == {stopped}
    assert not (left["containers"] | left["mounts"] | left["cgroups"] | left["processes"]), left
    with client(host, token) as c:
        assert c.post(f"/v1/vms/{stopped}/start").json()["status_detail"] == "ready"
        assert run(c, stopped, "cat /root/marker")["stdout"] == "on-disk\n"
        destroy(c, stopped)
    assert_nothing_left(host)


# ---- orphans ------------------------------------------------------------------------------------------------


def test_everything_no_record_owns_is_removed_at_start(host: NodeHost) -> None:
    srv = host.start()
    token = signup(srv).token
    with client(host, token) as c:
        kept = create_ready(c)["id"]
        kept_sleeper = start_background_sleep(host, c, kept)
        orphan = create_ready(c)["id"]
        orphan_sleeper = start_background_sleep(host, c, orphan)
    assert_nothing_left(host, keep={kept, orphan})

    host.kill()
    engine = create_engine(normalise_url(host.database_url))
    try:
        with engine.begin() as conn:
            assert conn.execute(text("DELETE FROM vms WHERE id = :id"), {"id": orphan}).rowcount == 1
    finally:
        engine.dispose()
    # strays of each kind, as a crash in the middle of a boot could leave them
    vols = host.node_root / "disk" / "vols"
    subprocess.run(["btrfs", "subvolume", "create", str(vols / "stray-vol")], check=True, capture_output=True)
    (host.node_root / "bundles" / "stray-bundle").mkdir()
    mnt = host.node_root / "bundles" / "stray-mnt" / "rootfs"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    parents = cgroup_parents(host.node_id)
    assert parents
    for parent in parents:
        (parent / "stray-cg").mkdir()
    strays = {"stray-vol", "stray-bundle", "stray-mnt", "stray-cg"}
    left = host_leftovers(host.node_root, host.node_id)
    assert set().union(*left.values()) == {kept, orphan} | strays, left

    host.start()
    assert not alive(orphan_sleeper)
    assert alive(kept_sleeper)
    assert_nothing_left(host, keep={kept})
    with client(host, token) as c:
        assert c.get(f"/v1/vms/{orphan}").status_code == 404
        vm = c.get(f"/v1/vms/{kept}").json()
        assert vm["status_detail"] == "ready", vm
        assert run(c, kept, "echo $((6*7))")["stdout"] == "42\n"
        destroy(c, kept)
    assert_nothing_left(host)


# ---- a kill at every moment ---------------------------------------------------------------------------------


def send_then_kill(host: NodeHost, token: str, method: str, path: str, delay_ms: int) -> dict[str, Any]:
    """Send one request from a thread, SIGKILL the server ``delay_ms`` later; what the client saw."""
    seen: dict[str, Any] = {}
    body = (
        {"name": unique_name(), "public_key": public_key()}
        if method == "POST" and path == "/v1/vms"
        else None
    )
    c = client(host, token, timeout=30)

    def send() -> None:
        try:
            resp = c.request(method, path, json=body)
            seen["status"] = resp.status_code
            seen["body"] = resp.json() if resp.content else None
        except httpx.TransportError as exc:
            seen["error"] = type(exc).__name__

    thread = threading.Thread(target=send)
    thread.start()
    time.sleep(delay_ms / 1000)
    host.kill()
    thread.join(timeout=60)
    c.close()
    assert not thread.is_alive()
    return seen


@pytest.mark.parametrize("operation", ["create", "create-pooled", "stop", "start", "destroy"])
def test_a_kill_at_any_moment_leaves_no_vm_stuck_and_nothing_behind(tmp_path: Path, operation: str) -> None:
    """For each delay: send the request (create, stop, start or destroy), kill -9 the server after the delay,
    start it again. Every VM is settled, the one operated on in a state that fits what the client was told, a
    running VM runs commands; once that VM is destroyed, only a bystander VM (adopted at every start) and, with
    a warm pool, the pool's sandboxes (no VM's) are left on the host. ``create-pooled``: a warm pool of 2, so
    the create is a hand-over."""
    pooled = operation == "create-pooled"
    creating = operation.startswith("create")
    delays = KILL_DELAYS_MS + (LATER_IN_A_BOOT_MS if operation == "create" else ())
    problems: list[str] = []
    with node_host(tmp_path, CORRAL_WARM_POOL_SIZE="2" if pooled else "0") as host:
        srv = host.start()
        token = signup(srv).token
        with client(host, token) as c:
            bystander = create_ready(c)["id"]
        for delay in delays:
            target: str | None = None
            with client(host, token) as c:
                if pooled:
                    wait_pool_full(host, 2)
                if not creating:
                    target = create_ready(c)["id"]
                    if operation in ("start", "destroy"):
                        assert c.post(f"/v1/vms/{target}/stop").status_code == 200
            if creating:
                seen = send_then_kill(host, token, "POST", "/v1/vms", delay)
                if seen.get("status") == 201:
                    target = seen["body"]["id"]
            elif operation in ("stop", "start"):
                seen = send_then_kill(host, token, "POST", f"/v1/vms/{target}/{operation}", delay)
            else:
                seen = send_then_kill(host, token, "DELETE", f"/v1/vms/{target}", delay)
            assert seen.get("status") in (None, 200, 201, 204), seen
            host.start()

            with client(host, token) as c:
                vms = all_vms(c)
                by_id = {vm["id"]: vm for vm in vms}
                if creating and target is None:
                    # the client heard nothing: the VM may or may not have been recorded
                    fresh = [vm for vm in vms if vm["id"] != bystander and vm["status_detail"] != "destroyed"]
                    assert len(fresh) <= 1, vms
                    target = fresh[0]["id"] if fresh else None
                for vm in vms:
                    if vm["status_detail"] not in SETTLED:
                        problems.append(
                            f"{operation}, killed after {delay} ms: {vm['id']} is {vm['status']}/"
                            f"{vm['status_detail']} after the restart"
                        )
                    if vm["status_detail"] == "failed":
                        assert vm["failure_reason"], vm
                    if vm["status"] == "running":
                        out = run(c, vm["id"], "echo $((6*7))")
                        assert out["stdout"] == "42\n", (vm, out)
                assert by_id[bystander]["status_detail"] == "ready", by_id[bystander]
                state = by_id[target]["status_detail"] if target else "(not recorded)"
                allowed = {
                    "create": {"ready", "failed", "(not recorded)"},
                    "stop": {"ready", "stopped", "failed"},
                    "start": {"stopped", "ready", "failed"},
                    "destroy": {"stopped", "destroyed", "failed"},
                }[operation.removesuffix("-pooled")]
                if "status" in seen:  # the client was told it was done
                    allowed = {
                        "create": {"ready", "failed"},
                        "stop": {"stopped"},
                        "start": {"ready"},
                        "destroy": {"destroyed"},
                    }[operation.removesuffix("-pooled")]
                if state not in allowed | {"running"}:  # a VM left in running/running is reported above
                    problems.append(f"{operation}, killed after {delay} ms (client saw {seen}): {state}")
                reason = by_id[target]["failure_reason"] if target else None
                told = seen.get("status", seen.get("error"))
                print(f"{operation}, killed after {delay:>3} ms: the client got {told}, then {state}", end="")
                print(f" ({reason})" if reason else "")

                if target is not None:
                    destroy(c, target)
                    assert c.get(f"/v1/vms/{target}").json()["status_detail"] == "destroyed"
                vm_ids = {vm["id"] for vm in all_vms(c)}
            left = host_leftovers(host.node_root, host.node_id)
            owned = {kind: ids & vm_ids for kind, ids in left.items()}
            assert owned == {kind: {bystander} for kind in left}, f"after {delay} ms: {left}" + logs(host)
            others = set().union(*left.values()) - vm_ids
            assert len(others) <= (3 if pooled else 0), f"not a VM's: {left}" + logs(host)
        assert not problems, "\n".join(problems) + logs(host)
        with client(host, token) as c:
            destroy(c, bystander)
        if pooled:
            host.stop()  # a clean shutdown removes the pool's sandboxes
        assert_nothing_left(host)


def wait_pool_full(host: NodeHost, size: int, timeout: float = 60.0) -> None:
    """Until the warm pool holds ``size`` running sandboxes that are no VM's."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        containers = host_leftovers(host.node_root, host.node_id)["containers"]
        running = {cid for cid in containers if (container_state(host, cid) or {}).get("status") == "running"}
        if len(running - recorded_vm_ids(host)) >= size:
            return
        time.sleep(0.1)
    raise AssertionError("the warm pool did not fill up" + logs(host))


# ---- fifty at once ------------------------------------------------------------------------------------------


def test_fifty_sandboxes_at_once_leave_nothing_behind(tmp_path: Path) -> None:
    netns_before = netns_names()
    # fifty VMs of one account at once: room for them (admission is tested in test_capacity.py)
    with node_host(
        tmp_path,
        CORRAL_WARM_POOL_SIZE="2",
        CORRAL_QUOTA_VMS="64",
        CORRAL_QUOTA_VCPUS="64",
        CORRAL_OVERCOMMIT_VCPUS="32",
        CORRAL_OVERCOMMIT_MEM="4",
        CORRAL_OVERCOMMIT_DISK="8",
    ) as host:
        srv = host.start()
        token = signup(srv).token

        def lifetime(_: int) -> str:
            with client(host, token, timeout=300) as c:
                resp = c.post("/v1/vms", json={"name": unique_name(), "public_key": public_key()})
                assert resp.status_code == 201, resp.text
                vm_id: str = resp.json()["id"]
                vm = wait_detail(c, vm_id, timeout=600)
                assert vm["status_detail"] == "ready", vm
                out = run(c, vm_id, "echo $((6*7))")
                assert (out["exit_code"], out["stdout"]) == (0, "42\n"), out
                resp = c.post(f"/v1/vms/{vm_id}/stop")
                assert resp.status_code == 200, resp.text
                assert resp.json()["status_detail"] == "stopped", resp.text
                resp = c.delete(f"/v1/vms/{vm_id}")
                assert resp.status_code == 204, resp.text
                return vm_id

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=50) as pool:
            futures = [pool.submit(lifetime, i) for i in range(50)]
        errors = [repr(f.exception()) for f in futures if f.exception() is not None]
        assert not errors, f"{len(errors)} of 50 failed: {errors[:5]}" + logs(host)
        ids = {f.result() for f in futures}
        assert len(ids) == 50
        print(f"\n50 sandboxes created, used, stopped and destroyed in {time.monotonic() - started:.1f} s")

        with client(host, token) as c:
            vms = all_vms(c)
        assert {vm["id"] for vm in vms} == ids
        assert {vm["status_detail"] for vm in vms} == {"destroyed"}
        # while the server runs, only the warm pool's sandboxes (no VM's) may be there
        left = host_leftovers(host.node_root, host.node_id)
        assert not set().union(*left.values()) & ids, left
        assert len(set().union(*left.values())) <= 3, left  # two ready, one booting at most
        # a clean shutdown removes the pool's sandboxes too
        host.stop()
        assert_nothing_left(host)
    assert netns_names() == netns_before
