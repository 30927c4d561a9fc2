"""Sandbox state on the real kernel, with crun (built with libcriu) and with runc: a process counting in memory
and the files beside it continue after hibernate/resume, in each fork child (which then diverge), after a
rollback, and in a new VM booted from a snapshot; every process exec'd into such a sandbox is confined exactly
like one in a fresh sandbox; failures leave the VM running and nothing half-made behind. Everything that
involves the runtime runs with both; request checks and the store's damage checks with crun only."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakenet import FakeInternet
from tests.sandbox.conftest import internet_env
from tests.support import Account, Server, node_server, signup
from tests.vmtools import create_ready, destroy, public_key, run, sandbox_pid_of, unique_name, wait_detail

ROOT_HOST_ID = 100000
# the counter keeps its value only in memory (a shell variable); it writes it to a file beside it
COUNTER = (
    "nohup sh -c 'i=$START; echo $$ > /root/counter.pid; "
    "while :; do i=$((i+1)); echo $i > /root/count; sleep 0.02; done' >/dev/null 2>&1 &"
)
SUBNETS = {"crun": "100.127.90.0/30", "runc": "100.127.91.0/30"}
# what does not depend on the runtime (request checks, store damage, disk-only paths) runs with crun only
CRUN_ONLY = pytest.mark.parametrize("state_node", ["crun"], indirect=True)


@pytest.fixture(scope="module", params=["crun", "runc"])
def state_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, internet: FakeInternet
) -> Iterator[Server]:
    runtime = str(request.param)
    env = {"CORRAL_RUNTIME": runtime, **internet_env(internet, SUBNETS[runtime])}
    with node_server(tmp_path_factory.mktemp(f"state-{runtime}"), **env) as srv:
        yield srv


@pytest.fixture
def acct(state_node: Server) -> Iterator[Account]:
    a = signup(state_node)
    yield a
    a.client.close()


def sh(c: httpx.Client, vm_id: str, script: str) -> str:
    out = run(c, vm_id, script)
    assert out["exit_code"] == 0, out
    return str(out["stdout"])


def start_counter(c: httpx.Client, vm_id: str) -> int:
    """Start the counter at a random value only its memory holds; return that start."""
    start = secrets.randbelow(10**9) + 10**6
    assert run(c, vm_id, COUNTER, env={"START": str(start)})["exit_code"] == 0
    wait_count(c, vm_id, above=start + 3)
    return start


def count(c: httpx.Client, vm_id: str) -> int:
    """The counter's value (read again when caught between the file's truncation and its write)."""
    for _ in range(50):
        text = sh(c, vm_id, "cat /root/count").strip()
        if text:
            return int(text)
        time.sleep(0.01)
    raise AssertionError("the counter file stays empty")


def wait_count(c: httpx.Client, vm_id: str, *, above: int, timeout: float = 10.0) -> int:
    end = time.monotonic() + timeout
    while True:
        text = run(c, vm_id, "cat /root/count 2>/dev/null")["stdout"].strip()
        if text.isdigit() and int(text) > above:
            return int(text)
        assert time.monotonic() < end, f"the counter did not pass {above} (it is at {text!r})"
        time.sleep(0.05)


def node_root(srv: Server) -> Path:
    return srv.data_dir / "node"


def node_id(srv: Server) -> str:
    return (node_root(srv) / "node-id").read_text().strip()


def assert_confined(srv: Server, c: httpx.Client, vm: dict[str, Any]) -> None:
    """A process exec'd now runs under the seccomp filter with no_new_privs, in the user namespace, and in
    the sandbox's own cgroups with its limits: like one in a fresh sandbox."""
    vm_id = vm["id"]
    inside = sh(c, vm_id, "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; cat /proc/self/uid_map")
    assert ("Seccomp:\t2" in inside, "NoNewPrivs:\t1" in inside) == (True, True), inside
    assert inside.split()[-3:] == ["0", str(ROOT_HOST_ID), "65536"], inside
    tag = str(1000 + secrets.randbelow(10**6))
    assert run(c, vm_id, f"nohup sleep {tag} >/dev/null 2>&1 &")["exit_code"] == 0
    pid = None
    for _ in range(100):
        pid = sandbox_pid_of(node_root(srv), node_id(srv), vm_id, f"sleep {tag}")
        if pid:
            break
        time.sleep(0.02)
    assert pid, "the exec'd process is not in the sandbox's cgroups"
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(r"^Seccomp:\s+2$", status, re.M)
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
    assert re.search(rf"^Uid:\s+{ROOT_HOST_ID}\s", status, re.M), status
    cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    memory = next(line for line in cgroups.splitlines() if ":memory:" in line or line.startswith("0::"))
    path = memory.split(":", 2)[2]
    assert path.endswith(f"/corral-{node_id(srv)}/{vm_id}"), cgroups
    limit_file = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
    if limit_file.exists():
        assert int(limit_file.read_text()) == vm["mem_mib"] * 1024 * 1024
    pids_file = Path("/sys/fs/cgroup/pids") / path.lstrip("/") / "pids.max"
    if pids_file.exists():
        assert pids_file.read_text().strip() == "4096"
    run(c, vm_id, f"pkill -f 'sleep {tag}'")
    host_null = os.stat("/dev/null")  # the runtime chowns the stdio it is given: never the host's /dev/null
    assert (host_null.st_uid, host_null.st_mode & 0o777) == (0, 0o666)


def processes_of(srv: Server, vm_id: str) -> list[str]:
    """The live processes on the host in the sandbox's cgroups (a zombie holds no CPU or memory: the host's
    init reaps the sandbox's killed init when it gets to it)."""
    marker = f"/corral-{node_id(srv)}/{vm_id}"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (
                    marker in (entry / "cgroup").read_text()
                    and (entry / "stat").read_text().split()[2] != "Z"
                ):
                    found.append(f"{entry.name}: {(entry / 'cmdline').read_bytes()!r}")
            except OSError:
                continue
    return found


def captures(srv: Server) -> set[str]:
    states = node_root(srv) / "disk" / "states"
    return {p.name for p in states.iterdir()} if states.is_dir() else set()


def wait_snapshot(c: httpx.Client, snap_id: str, timeout: float = 60.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        snap: dict[str, Any] = c.get(f"/v1/snapshots/{snap_id}").json()["data"]
        if not seen or seen[-1] != snap["status"]:
            seen.append(snap["status"])
        if snap["status"] in ("ready", "failed") or time.monotonic() > end:
            snap["seen"] = seen
            return snap
        time.sleep(0.02)


# ---- hibernate / resume ---------------------------------------------------------------------------------------


def test_hibernate_frees_the_sandbox_and_resume_continues_its_processes(
    state_node: Server, acct: Account
) -> None:
    c = acct.client
    vm = create_ready(c, mem_mib=256)
    try:
        start_counter(c, vm["id"])
        sh(c, vm["id"], "echo kept > /root/file")
        pid_inside = sh(c, vm["id"], "cat /root/counter.pid").strip()
        before = count(c, vm["id"])

        r = c.post(f"/v1/vms/{vm['id']}/hibernate")
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["status_detail"]) == ("stopped", "hibernated")
        assert processes_of(state_node, vm["id"]) == [], "a hibernated VM still holds processes"
        assert c.post(f"/v1/vms/{vm['id']}/exec", json={"command": "true"}).status_code == 409
        assert c.post(f"/v1/vms/{vm['id']}/hibernate").json()["error"]["code"] == "vm_not_running"
        assert c.post(f"/v1/vms/{vm['id']}/start").status_code == 409

        r = c.post(f"/v1/vms/{vm['id']}/resume")
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["status_detail"]) == ("running", "ready")
        after = count(c, vm["id"])
        assert after >= before, "the counter went back: its memory was not restored"
        wait_count(c, vm["id"], above=after)  # and it runs on
        assert sh(c, vm["id"], "cat /root/counter.pid").strip() == pid_inside
        assert sh(c, vm["id"], "cat /root/file") == "kept\n"
        assert_confined(state_node, c, vm)
        # the network came back (and unprivileged ping with it)
        assert run(c, vm["id"], "ping -c 1 -W 2 169.254.1.1")["exit_code"] == 0
        assert c.post(f"/v1/vms/{vm['id']}/resume").json()["error"]["code"] == "vm_not_hibernated"
        assert captures(state_node) == set()
    finally:
        destroy(c, vm["id"])


@CRUN_ONLY
def test_a_hibernated_vm_can_be_destroyed(state_node: Server, acct: Account) -> None:
    c = acct.client
    vm = create_ready(c)
    assert c.post(f"/v1/vms/{vm['id']}/hibernate").status_code == 200
    assert captures(state_node) == {f"hib-{vm['id']}"}
    assert c.delete(f"/v1/vms/{vm['id']}").status_code == 204
    assert c.get(f"/v1/vms/{vm['id']}").json()["status"] == "destroyed"
    assert captures(state_node) == set()
    assert not (node_root(state_node) / "disk" / "vols" / vm["id"]).exists()


# ---- fork -----------------------------------------------------------------------------------------------------


def qgroup(pool: Path, volume: Path) -> tuple[int, int]:
    """(referenced, exclusive) bytes of a subvolume."""
    show = subprocess.run(
        ["btrfs", "subvolume", "show", str(volume)], capture_output=True, text=True, check=True
    )
    subvol_id = re.search(r"Subvolume ID:\s+(\d+)", show.stdout)
    assert subvol_id
    subprocess.run(["btrfs", "quota", "rescan", "-w", str(pool)], capture_output=True, check=False)
    out = subprocess.run(
        ["btrfs", "qgroup", "show", "--raw", "-r", "-e", str(pool)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == f"0/{subvol_id.group(1)}":
            return int(parts[1]), int(parts[2])
    raise AssertionError(f"no qgroup for {volume}:\n{out}")


def test_fork_children_continue_the_source_and_diverge(state_node: Server, acct: Account) -> None:
    c = acct.client
    src = create_ready(c, mem_mib=256)
    kids: list[dict[str, Any]] = []
    try:
        start_counter(c, src["id"])
        sh(c, src["id"], "echo source > /root/who; head -c 33554432 /dev/urandom > /root/big")
        pid_inside = sh(c, src["id"], "cat /root/counter.pid").strip()
        before = count(c, src["id"])

        r = c.post(f"/v1/vms/{src['id']}/fork", json={"count": 2})
        assert r.status_code == 201, r.text
        kids = r.json()["data"]
        assert [k["status_detail"] for k in kids] == ["ready", "ready"], kids
        ids = {k["id"] for k in kids}
        assert len(ids) == 2
        assert src["id"] not in ids
        assert all(k["name"].startswith(f"{src['name']}-fork-") for k in kids)

        addresses = set()
        for kid in kids:
            got = count(c, kid["id"])
            assert got >= before, "a child's counter went back"
            wait_count(c, kid["id"], above=got)
            assert sh(c, kid["id"], "cat /root/counter.pid").strip() == pid_inside
            assert sh(c, kid["id"], "hostname").strip() == kid["id"].replace("_", "-")
            addresses.add(sh(c, kid["id"], "ip -4 -o addr show eth0").split()[3])
            assert sh(c, kid["id"], "cat /root/who") == "source\n"
            assert run(c, kid["id"], "ping -c 1 -W 2 169.254.1.1")["exit_code"] == 0
        addresses.add(sh(c, src["id"], "ip -4 -o addr show eth0").split()[3])
        assert len(addresses) == 3, "a child shares an address"
        # they diverge: each one's writes are its own, and every counter runs on its own
        for kid in kids:
            sh(c, kid["id"], f"echo {kid['id']} > /root/who")
        assert sh(c, src["id"], "cat /root/who") == "source\n"
        for kid in kids:
            assert sh(c, kid["id"], "cat /root/who") == f"{kid['id']}\n"
        for vm in (src, *kids):
            wait_count(c, vm["id"], above=count(c, vm["id"]))
        assert_confined(state_node, c, kids[0])
        # the 32 MiB file is shared with the source, not copied
        pool = node_root(state_node) / "disk"
        referenced, exclusive = qgroup(pool, pool / "vols" / kids[0]["id"])
        assert (referenced > 32 << 20, exclusive < 8 << 20) == (True, True), (referenced, exclusive)
        assert captures(state_node) == set()
    finally:
        for vm in (*kids, src):
            destroy(c, vm["id"])


@CRUN_ONLY
def test_fork_refuses_bad_counts_and_stopped_vms(state_node: Server, acct: Account) -> None:
    c = acct.client
    vm = create_ready(c)
    try:
        for bad in (0, 17, -1, "2", None):
            r = c.post(f"/v1/vms/{vm['id']}/fork", json={"count": bad})
            assert r.status_code == 422, (bad, r.text)
        assert c.post("/v1/vms/vm_nosuchvm0000/fork").json()["error"]["code"] == "vm_not_found"
        assert c.post(f"/v1/vms/{vm['id']}/stop").status_code == 200
        r = c.post(f"/v1/vms/{vm['id']}/fork")
        assert (r.status_code, r.json()["error"]["code"]) == (409, "vm_not_running")
        names = [v["name"] for v in c.get("/v1/vms", params={"limit": 100}).json()["data"]]
        assert not [n for n in names if n.startswith(vm["name"] + "-fork-")]
    finally:
        destroy(c, vm["id"])


# ---- checkpoints and rollback ---------------------------------------------------------------------------------


def test_rollback_puts_disk_and_memory_back(state_node: Server, acct: Account) -> None:
    c = acct.client
    vm = create_ready(c, mem_mib=256)
    try:
        start_counter(c, vm["id"])
        sh(c, vm["id"], "echo one > /root/file")
        at_checkpoint = count(c, vm["id"])
        r = c.post(f"/v1/vms/{vm['id']}/checkpoints", json={"name": "one"})
        assert r.status_code == 201, r.text
        ckpt = r.json()["data"]
        assert (ckpt["vm_id"], ckpt["name"], ckpt["memory"]) == (vm["id"], "one", True)
        assert ckpt["id"].startswith("ckpt_")
        assert ckpt["size_bytes"] > 0
        dup = c.post(f"/v1/vms/{vm['id']}/checkpoints", json={"name": "one"})
        assert (dup.status_code, dup.json()["error"]["code"]) == (409, "checkpoint_name_taken")
        for bad in ("", "-x", "a b", "x" * 65, "../x"):
            assert c.post(f"/v1/vms/{vm['id']}/checkpoints", json={"name": bad}).status_code == 422, bad
        listed = c.get(f"/v1/vms/{vm['id']}/checkpoints").json()
        assert [x["id"] for x in listed["data"]] == [ckpt["id"]]
        assert listed["has_more"] is False
        assert c.get(f"/v1/vms/{vm['id']}/checkpoints/{ckpt['id']}").json()["data"] == ckpt

        sh(c, vm["id"], "echo two > /root/file; touch /root/after")
        later = wait_count(c, vm["id"], above=at_checkpoint + 20)
        for _ in range(2):  # a checkpoint can be rolled back to again
            r = c.post(f"/v1/vms/{vm['id']}/rollback", json={"checkpoint_id": ckpt["id"]})
            assert r.status_code == 200, r.text
            assert r.json()["status_detail"] == "ready"
            back = count(c, vm["id"])
            assert at_checkpoint <= back < later, (at_checkpoint, back, later)
            assert sh(c, vm["id"], "cat /root/file; ls /root/after 2>&1 || true").startswith("one\n")
            assert "No such file" in sh(c, vm["id"], "ls /root/after 2>&1 || true")
            wait_count(c, vm["id"], above=back)
            sh(c, vm["id"], "touch /root/after")
        assert_confined(state_node, c, vm)
        assert run(c, vm["id"], "ping -c 1 -W 2 169.254.1.1")["exit_code"] == 0

        assert c.delete(f"/v1/vms/{vm['id']}/checkpoints/{ckpt['id']}").status_code == 204
        gone = c.get(f"/v1/vms/{vm['id']}/checkpoints/{ckpt['id']}")
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "checkpoint_not_found")
        r = c.post(f"/v1/vms/{vm['id']}/rollback", json={"checkpoint_id": ckpt["id"]})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "checkpoint_not_found")
        assert captures(state_node) == set()
    finally:
        destroy(c, vm["id"])


# a TCP server answering every line with a token only its memory holds (a thread per connection), and a
# client that asks it once and leaves only when the server has closed its side (no connected socket is left
# in the server at a dump: CRIU runs without --tcp-established)
TCP_SERVER = """
import os, socket, threading
token = os.urandom(8).hex().encode()
def serve(conn):
    with conn, conn.makefile("rb") as lines:
        for _ in lines:
            conn.sendall(token + b"\\n")
srv = socket.create_server(("127.0.0.1", 8123))
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""
TCP_ASK = """
import socket
s = socket.create_connection(("127.0.0.1", 8123), timeout=5)
s.sendall(b"hi\\n")
s.shutdown(socket.SHUT_WR)
print(s.makefile().read().strip())
"""
ASK = "python3 /root/ask.py"


@CRUN_ONLY
def test_a_vm_with_a_listening_tcp_server_is_checkpointed_and_hibernated(
    state_node: Server, acct: Account
) -> None:
    """CRIU 4.1.1 failed every dump of a TCP socket on kernels >= 6.16 (getsockopt SO_PASSCRED refused:
    scripts/patches/criu-sockopt-passcred.patch); the server answers on after a rollback and a resume."""
    c = acct.client
    vm = create_ready(c, mem_mib=256)
    try:
        sh(
            c,
            vm["id"],
            f"cat > /root/srv.py <<'EOF'{TCP_SERVER}EOF\ncat > /root/ask.py <<'EOF'{TCP_ASK}EOF\n",
        )
        sh(c, vm["id"], "nohup python3 /root/srv.py >/root/srv.log 2>&1 &")
        token = ""
        for _ in range(100):
            out = run(c, vm["id"], ASK)
            if out["exit_code"] == 0:
                token = str(out["stdout"]).strip()
                break
            time.sleep(0.05)
        assert re.fullmatch(r"[0-9a-f]{16}", token), token

        r = c.post(f"/v1/vms/{vm['id']}/checkpoints", json={"name": "serving"})
        assert r.status_code == 201, r.text
        assert sh(c, vm["id"], ASK).strip() == token  # left running, it serves on
        r = c.post(f"/v1/vms/{vm['id']}/rollback", json={"checkpoint_id": r.json()["data"]["id"]})
        assert (r.status_code, r.json()["status_detail"]) == (200, "ready"), r.text
        assert sh(c, vm["id"], ASK).strip() == token

        r = c.post(f"/v1/vms/{vm['id']}/hibernate")
        assert (r.status_code, r.json()["status_detail"]) == (200, "hibernated"), r.text
        r = c.post(f"/v1/vms/{vm['id']}/resume")
        assert (r.status_code, r.json()["status_detail"]) == (200, "ready"), r.text
        assert sh(c, vm["id"], ASK).strip() == token
        assert_confined(state_node, c, vm)
    finally:
        destroy(c, vm["id"])


@CRUN_ONLY
def test_disk_only_checkpoint_rolls_back_the_disk_and_reboots(state_node: Server, acct: Account) -> None:
    c = acct.client
    vm = create_ready(c)
    try:
        sh(c, vm["id"], "echo one > /root/file")
        r = c.post(f"/v1/vms/{vm['id']}/checkpoints", json={"name": "disk", "disk_only": True})
        assert (r.status_code, r.json()["data"]["memory"]) == (201, False), r.text
        start_counter(c, vm["id"])
        sh(c, vm["id"], "echo two > /root/file")
        r = c.post(f"/v1/vms/{vm['id']}/rollback", json={"checkpoint_id": r.json()["data"]["id"]})
        assert r.status_code == 200, r.text
        assert sh(c, vm["id"], "cat /root/file") == "one\n"
        time.sleep(0.2)
        assert run(c, vm["id"], "cat /root/count")["exit_code"] != 0, (
            "the counter came back from a disk-only checkpoint"
        )
    finally:
        destroy(c, vm["id"])


# ---- snapshots ------------------------------------------------------------------------------------------------


def test_snapshot_boots_a_new_vm_that_continues_and_outlives_the_snapshot(
    state_node: Server, acct: Account
) -> None:
    c = acct.client
    vm = create_ready(c, mem_mib=256)
    made: list[str] = [vm["id"]]
    try:
        start_counter(c, vm["id"])
        data = secrets.token_hex(16)
        sh(c, vm["id"], f"echo {data} > /root/data")
        before = count(c, vm["id"])
        r = c.post(f"/v1/vms/{vm['id']}/snapshots", json={"label": "before-refactor"})
        assert r.status_code == 201, r.text
        snap = r.json()["data"]
        assert snap["status"] == "pending"
        assert snap["r2_key"] is None
        assert snap["size_bytes"] is None
        assert (snap["source_virtual_machine_id"], snap["label"]) == (vm["id"], "before-refactor")
        assert (snap["source_base_image"], snap["source_snapshot_id"]) == ("debian:bookworm", None)
        done = wait_snapshot(c, snap["id"])
        assert done["status"] == "ready", done
        order = ["pending", "uploading", "ready"]  # as polled: a short state may be missed, none may go back
        assert done["seen"] == sorted(done["seen"], key=order.index), done["seen"]
        assert done["r2_key"] == f"snapshots/{snap['id']}"
        assert done["size_bytes"] > 0
        assert sh(c, vm["id"], "cat /root/data").strip() == data  # the source runs on
        wait_count(c, vm["id"], above=before)

        assert c.get("/v1/snapshots").json()["data"][0]["id"] == snap["id"]
        assert [s["id"] for s in c.get(f"/v1/vms/{vm['id']}/snapshots").json()["data"]] == [snap["id"]]
        other = signup(state_node)
        assert c.get("/v1/snapshots").status_code == 200
        assert other.client.get(f"/v1/snapshots/{snap['id']}").status_code == 404
        assert other.client.get("/v1/snapshots").json()["data"] == []
        r = other.client.post(
            "/v1/vms", json={"name": unique_name(), "public_key": public_key(), "snapshot_id": snap["id"]}
        )
        assert (r.status_code, r.json()["error"]["code"]) == (404, "snapshot_not_found")

        r = c.post(
            "/v1/vms", json={"name": unique_name(), "public_key": public_key(), "snapshot_id": snap["id"]}
        )
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
        new = wait_detail(c, r.json()["id"])
        assert new["status_detail"] == "ready", new
        assert (new["snapshot_id"], new["mem_mib"]) == (snap["id"], 256)
        got = count(c, new["id"])
        assert got >= before
        wait_count(c, new["id"], above=got)
        assert sh(c, new["id"], "cat /root/data").strip() == data
        assert sh(c, new["id"], "hostname").strip() == new["id"].replace("_", "-")
        assert_confined(state_node, c, new)

        # a snapshot of the restored VM names its lineage
        r = c.post(f"/v1/vms/{new['id']}/snapshots", json={"disk_only": True})
        second = wait_snapshot(c, r.json()["data"]["id"])
        assert (second["source_snapshot_id"], second["source_base_image"], second["memory"]) == (
            snap["id"],
            None,
            False,
        )

        # deleting the snapshot a VM came from does not touch that VM
        assert c.delete(f"/v1/snapshots/{snap['id']}").status_code == 204
        assert c.get(f"/v1/snapshots/{snap['id']}").status_code == 404
        assert snap["id"] not in [s["id"] for s in c.get("/v1/snapshots").json()["data"]]
        assert not (state_node.data_dir / "snapshots" / snap["id"]).exists()
        assert c.delete(f"/v1/snapshots/{snap['id']}").status_code == 404
        assert sh(c, new["id"], "cat /root/data").strip() == data
        assert c.post(f"/v1/vms/{new['id']}/stop").status_code == 200
        assert c.post(f"/v1/vms/{new['id']}/start").status_code == 200
        assert sh(c, new["id"], "cat /root/data").strip() == data
        r = c.post(
            "/v1/vms", json={"name": unique_name(), "public_key": public_key(), "snapshot_id": snap["id"]}
        )
        assert (r.status_code, r.json()["error"]["code"]) == (404, "snapshot_not_found")
        assert c.delete(f"/v1/snapshots/{second['id']}").status_code == 204
    finally:
        for vm_id in made:
            destroy(c, vm_id)


@CRUN_ONLY
def test_disk_only_snapshot_boots_with_the_files_and_no_processes(state_node: Server, acct: Account) -> None:
    c = acct.client
    vm = create_ready(c)
    made = [vm["id"]]
    try:
        start_counter(c, vm["id"])
        sh(c, vm["id"], "echo files > /root/data")
        r = c.post(f"/v1/vms/{vm['id']}/snapshots", json={"disk_only": True})
        snap = wait_snapshot(c, r.json()["data"]["id"])
        assert snap["status"] == "ready"
        assert snap["memory"] is False
        r = c.post(
            "/v1/vms", json={"name": unique_name(), "public_key": public_key(), "snapshot_id": snap["id"]}
        )
        made.append(r.json()["id"])
        new = wait_detail(c, r.json()["id"])
        assert new["status_detail"] == "ready", new
        assert sh(c, new["id"], "cat /root/data") == "files\n"
        frozen = sh(c, new["id"], "cat /root/count")
        time.sleep(0.3)
        assert sh(c, new["id"], "cat /root/count") == frozen, "a process came back from a disk-only snapshot"
        assert sh(c, new["id"], "hostname; cat /etc/hostname").split() == [new["id"].replace("_", "-")] * 2
        c.delete(f"/v1/snapshots/{snap['id']}")
    finally:
        for vm_id in made:
            destroy(c, vm_id)


WRITER = (
    'mkdir -p /root/w; nohup sh -c \'i=0; while :; do i=$((i+1)); printf "%s\\n" $i > /root/w/.tmp; '
    "mv /root/w/.tmp /root/w/$i; done' >/dev/null 2>&1 &"
)


def check_files(c: httpx.Client, vm_id: str) -> int:
    """Every file the writer made is whole and the numbering has no gap; returns the highest."""
    listing = sh(c, vm_id, 'cd /root/w && for f in [0-9]*; do printf \'%s %s\\n\' "$f" "$(cat $f)"; done')
    numbers = []
    for line in listing.splitlines():
        name, _, content = line.partition(" ")
        assert name == content, f"file {name} holds {content!r}"
        numbers.append(int(name))
    numbers.sort()
    assert numbers == list(range(1, len(numbers) + 1)), "the files have a gap"
    return numbers[-1]


def test_snapshot_of_a_vm_writing_files_restores_consistently(state_node: Server, acct: Account) -> None:
    c = acct.client
    vm = create_ready(c)
    made = [vm["id"]]
    try:
        assert run(c, vm["id"], WRITER)["exit_code"] == 0
        time.sleep(0.3)
        r = c.post(f"/v1/vms/{vm['id']}/snapshots")
        snap = wait_snapshot(c, r.json()["data"]["id"])
        assert (snap["status"], snap["failure_reason"]) == ("ready", None)
        r = c.post(
            "/v1/vms", json={"name": unique_name(), "public_key": public_key(), "snapshot_id": snap["id"]}
        )
        made.append(r.json()["id"])
        new = wait_detail(c, r.json()["id"])
        assert new["status_detail"] == "ready", new
        # disk and memory are of one instant: the restored writer goes on without a gap or a torn file
        first = check_files(c, new["id"])
        time.sleep(0.3)
        assert check_files(c, new["id"]) > first
        c.delete(f"/v1/snapshots/{snap['id']}")
    finally:
        for vm_id in made:
            destroy(c, vm_id)


# ---- failures -------------------------------------------------------------------------------------------------


def test_a_failing_dump_leaves_the_vm_running_and_nothing_behind(state_node: Server, acct: Account) -> None:
    """CRIU refuses a held file lock (no --file-locks): every operation that dumps fails, cleanly."""
    c = acct.client
    vm = create_ready(c)
    try:
        start_counter(c, vm["id"])
        assert run(c, vm["id"], "nohup flock /root/lock sleep 600 >/dev/null 2>&1 &")["exit_code"] == 0
        time.sleep(0.2)
        vms_before = {v["id"] for v in c.get("/v1/vms", params={"limit": 100}).json()["data"]}
        for path, body in (("hibernate", None), ("fork", {"count": 2}), ("checkpoints", {"name": "x"})):
            r = c.post(f"/v1/vms/{vm['id']}/{path}", json=body)
            assert (r.status_code, r.json()["error"]["code"]) == (500, "state_failed"), (path, r.text)
            assert c.get(f"/v1/vms/{vm['id']}").json()["status_detail"] == "ready"
            wait_count(c, vm["id"], above=count(c, vm["id"]))
            assert run(c, vm["id"], "ping -c 1 -W 2 169.254.1.1")["exit_code"] == 0, path
            assert captures(state_node) == set(), path
        assert {v["id"] for v in c.get("/v1/vms", params={"limit": 100}).json()["data"]} == vms_before
        assert c.get(f"/v1/vms/{vm['id']}/checkpoints").json()["data"] == []
        r = c.post(f"/v1/vms/{vm['id']}/snapshots")
        snap = wait_snapshot(c, r.json()["data"]["id"])
        assert snap["status"] == "failed", snap
        assert snap["failure_reason"], snap
        assert not (state_node.data_dir / "snapshots" / snap["id"]).exists()
        assert_confined(state_node, c, vm)
    finally:
        destroy(c, vm["id"])


@CRUN_ONLY
@pytest.mark.parametrize(
    "damage", ["flip a byte", "truncate", "remove a memory image", "remove the manifest"]
)
def test_a_damaged_snapshot_is_refused_and_marked_failed(
    state_node: Server, acct: Account, damage: str
) -> None:
    c = acct.client
    vm = create_ready(c)
    try:
        r = c.post(f"/v1/vms/{vm['id']}/snapshots")
        snap = wait_snapshot(c, r.json()["data"]["id"])
        assert (snap["status"], snap["failure_reason"]) == ("ready", None)
        stored = state_node.data_dir / "snapshots" / snap["id"]
        tar = stored / "disk.tar"
        if damage == "flip a byte":
            with open(tar, "r+b") as f:
                f.seek(tar.stat().st_size // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
        elif damage == "truncate":
            os.truncate(tar, tar.stat().st_size - 512)
        elif damage == "remove a memory image":
            next((stored / "memory").glob("pages-*.img")).unlink()
        else:
            (stored / "manifest.json").unlink()
        name = unique_name()
        r = c.post("/v1/vms", json={"name": name, "public_key": public_key(), "snapshot_id": snap["id"]})
        assert (r.status_code, r.json()["error"]["code"]) == (409, "snapshot_damaged"), r.text
        assert c.get("/v1/vms", params={"name": name}).json()["data"] == []
        got = c.get(f"/v1/snapshots/{snap['id']}").json()["data"]
        assert got["status"] == "failed"
        assert "snapshot" in got["failure_reason"]
        r = c.post("/v1/vms", json={"name": name, "public_key": public_key(), "snapshot_id": snap["id"]})
        assert (r.status_code, r.json()["error"]["code"]) == (409, "snapshot_not_ready")
        c.delete(f"/v1/snapshots/{snap['id']}")
    finally:
        destroy(c, vm["id"])


@CRUN_ONLY
def test_snapshot_requests_are_checked(state_node: Server, acct: Account) -> None:
    c = acct.client
    vm = create_ready(c)
    try:
        for bad in ({"label": 5}, {"label": "x" * 257}, {"disk_only": "yes"}, {"other": 1}):
            assert c.post(f"/v1/vms/{vm['id']}/snapshots", json=bad).status_code == 422, bad
        assert c.post("/v1/vms/vm_nosuchvm0000/snapshots").json()["error"]["code"] == "vm_not_found"
        assert c.get("/v1/snapshots/snap_nosuchsnap0").json()["error"]["code"] == "snapshot_not_found"
        assert c.get("/v1/snapshots", params={"limit": 0}).status_code == 400
        # deleted while it is being taken: gone at once from the API, its data once the capture ends
        snap_id = c.post(f"/v1/vms/{vm['id']}/snapshots").json()["data"]["id"]
        assert c.delete(f"/v1/snapshots/{snap_id}").status_code == 204
        assert c.get(f"/v1/snapshots/{snap_id}").status_code == 404
        stored = state_node.data_dir / "snapshots" / snap_id
        end = time.monotonic() + 20
        while not captures(state_node) and time.monotonic() < end:  # the capture starts...
            time.sleep(0.002)
        while captures(state_node) and time.monotonic() < end:  # ... and ends, with the upload
            time.sleep(0.05)
        assert (captures(state_node), stored.exists()) == (set(), False)
        assert c.post(f"/v1/vms/{vm['id']}/stop").status_code == 200
        r = c.post(f"/v1/vms/{vm['id']}/snapshots")
        assert (r.status_code, r.json()["error"]["code"]) == (409, "vm_not_running")
        assert c.get(f"/v1/vms/{vm['id']}/snapshots").json()["data"] == []
    finally:
        destroy(c, vm["id"])
