"""File workers end with their VM, on real sandboxes: with an SFTP session holding a file open for writing and
a download whose client never reads, stopping the VM kills every worker of that VM (by PID) and closes the
SFTP session, so nothing writes to (or keeps allocated) the disk of a VM that is stopped or destroyed. The
workers run in the VM's own cgroups (a memory snapshot still works meanwhile) and their environment holds
none of the server's settings."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncssh
import pytest

from tests import vmtools
from tests.sandbox.test_access import key_file
from tests.sandbox.test_state import wait_snapshot
from tests.support import Account, Server, signup
from tests.vmtools import create_ready, destroy, run

WORKER = b"corral.node.fileworker"


@pytest.fixture(scope="module")
def account(node: Server) -> Iterator[Account]:
    acct = signup(node)
    yield acct
    acct.client.close()


def _vm_pid(node: Server, vm_id: str) -> int:
    root = node.data_dir / "node"
    node_id = (root / "node-id").read_text().strip()
    pids = [pid for pid, owner in vmtools.node_processes(root, node_id).items() if owner == vm_id]
    assert pids, f"no process of {vm_id} found"
    return min(pids)


def _workers_of(userns: str) -> set[int]:
    """Host PIDs of the file workers in the user namespace ``userns`` (the sandbox's)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if WORKER in (entry / "cmdline").read_bytes() and os.readlink(entry / "ns" / "user") == userns:
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def _alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()}


def _cgroup(pid: int) -> list[str]:
    """The cgroups of ``pid``, one per hierarchy (``/proc/<pid>/cgroup``)."""
    return sorted(Path(f"/proc/{pid}/cgroup").read_text().splitlines())


def _environ(pids: set[int]) -> dict[int, bytes]:
    return {pid: Path(f"/proc/{pid}/environ").read_bytes() for pid in pids}


async def _until(done: Callable[[], bool], seconds: float) -> None:
    """Poll ``done`` every 0.1 s until it holds or ``seconds`` pass."""
    for _ in range(int(seconds * 10)):
        if done():
            return
        await asyncio.sleep(0.1)


def _stalled_download(srv: Server, token: str, vm_id: str, path: str) -> socket.socket:
    """A download whose client reads nothing (a tiny receive window)."""
    url = urlsplit(srv.url)
    assert url.hostname is not None
    assert url.port is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((url.hostname, url.port))
    sock.sendall(
        f"GET /v1/vms/{vm_id}/files/download?path={path} HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    return sock


async def _sftp_through_stop(node: Server, account: Account, vm: dict[str, Any]) -> dict[str, Any]:
    c, vm_id = account.client, vm["id"]
    info = (await asyncio.to_thread(c.get, f"/v1/vms/{vm_id}/ssh")).json()
    init = _vm_pid(node, vm_id)
    userns = os.readlink(f"/proc/{init}/ns/user")
    out: dict[str, Any] = {"vm_cgroup": _cgroup(init)}
    download = _stalled_download(node, account.token, vm_id, "/root/big")
    try:
        async with asyncssh.connect(
            info["host"], info["port"], username=info["username"], client_keys=[key_file()], known_hosts=None
        ) as conn:
            sftp = await conn.start_sftp_client()
            held = await sftp.open("/root/held", "wb")
            await held.write(b"before the stop\n")
            await _until(lambda: len(_workers_of(userns)) >= 2, 10)
            workers = _workers_of(userns)
            out["workers"] = workers
            out["environ"] = _environ(workers)
            out["cgroups"] = {pid: _cgroup(pid) for pid in workers}
            # a memory snapshot (CRIU, the cgroup freezer) while workers sit in the sandbox's cgroups
            snap = await asyncio.to_thread(c.post, f"/v1/vms/{vm_id}/snapshots", json={})
            assert snap.status_code == 201, snap.text
            out["snapshot"] = (await asyncio.to_thread(wait_snapshot, c, snap.json()["data"]["id"]))["status"]
            await asyncio.to_thread(c.delete, f"/v1/snapshots/{snap.json()['data']['id']}")
            out["sftp_after_snapshot"] = len(await sftp.listdir("/root")) > 0
            stopped = await asyncio.to_thread(c.post, f"/v1/vms/{vm_id}/stop", timeout=60)
            assert stopped.status_code == 200, stopped.text
            await _until(lambda: not _alive(workers), 5)
            out["alive_after_stop"] = _alive(workers) | _workers_of(userns)
            try:
                async with asyncio.timeout(10):
                    await held.write(b"after the stop\n", 1 << 20)
                    await sftp.listdir("/root")
                out["sftp_after_stop"] = "ok"
            except (asyncssh.Error, OSError, TimeoutError) as exc:
                out["sftp_after_stop"] = type(exc).__name__
            try:
                async with asyncio.timeout(5):
                    await sftp.wait_closed()
                out["sftp_closed"] = True
            except TimeoutError:
                out["sftp_closed"] = False
    finally:
        download.close()
    return out


def test_stop_ends_the_vms_file_workers_and_sftp_sessions(node: Server, account: Account) -> None:
    c = account.client
    vm = create_ready(c)
    try:
        made = run(c, vm["id"], "head -c 67108864 /dev/zero > /root/big && echo made")
        assert made["stdout"].strip() == "made", made
        out = asyncio.run(_sftp_through_stop(node, account, vm))
        assert len(out["workers"]) >= 2, out  # the SFTP session's and the download's
        assert out["alive_after_stop"] == set(), out
        assert out["sftp_after_stop"] != "ok", out
        assert out["sftp_closed"] is True, out
        assert out["snapshot"] == "ready", out
        assert out["sftp_after_snapshot"] is True, out
        for pid, joined in out["cgroups"].items():  # L5: charged to and capped by the sandbox's cgroups
            assert joined == out["vm_cgroup"], (pid, joined, out["vm_cgroup"])
        for pid, environ in out["environ"].items():  # L5: none of the server's settings or secrets
            names = {line.split(b"=", 1)[0] for line in environ.split(b"\0") if line}
            assert not any(name.startswith(b"CORRAL_") for name in names), (pid, names)
        # the file written through SFTP before the stop is on the disk, nothing after it
        started = c.post(f"/v1/vms/{vm['id']}/start", timeout=120)
        assert started.status_code == 200, started.text
        vmtools.wait_detail(c, vm["id"])
        assert run(c, vm["id"], "cat /root/held")["stdout"] == "before the stop\n"
        destroy(c, vm["id"])  # and the disk is gone: nothing holds it open
        assert not (node.data_dir / "node" / "disk" / "vols" / vm["id"]).exists()
    finally:
        destroy(c, vm["id"])


async def _sftp_through_hibernate(node: Server, account: Account, vm_id: str) -> dict[str, Any]:
    c = account.client
    info = (await asyncio.to_thread(c.get, f"/v1/vms/{vm_id}/ssh")).json()
    userns = os.readlink(f"/proc/{_vm_pid(node, vm_id)}/ns/user")
    out: dict[str, Any] = {}
    async with asyncssh.connect(
        info["host"], info["port"], username=info["username"], client_keys=[key_file()], known_hosts=None
    ) as conn:
        sftp = await conn.start_sftp_client()
        held = await sftp.open("/root/held", "wb")
        await held.write(b"before the hibernate\n")
        workers = _workers_of(userns)
        out["workers"] = workers
        slept = await asyncio.to_thread(c.post, f"/v1/vms/{vm_id}/hibernate", timeout=120)
        assert slept.status_code == 200, slept.text
        await _until(lambda: not _alive(workers), 5)
        out["alive"] = _alive(workers) | _workers_of(userns)
        try:
            async with asyncio.timeout(10):
                await held.write(b"after the hibernate\n", 1 << 20)
            out["write"] = "ok"
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            out["write"] = type(exc).__name__
        try:  # closed by the server (it also let go of the sandbox's root it held for the session)
            async with asyncio.timeout(5):
                await sftp.wait_closed()
            out["closed"] = True
        except TimeoutError:
            out["closed"] = False
    return out


def test_hibernate_ends_the_vms_sftp_sessions(node: Server, account: Account) -> None:
    c = account.client
    vm = create_ready(c)
    try:
        out = asyncio.run(_sftp_through_hibernate(node, account, vm["id"]))
        assert len(out["workers"]) == 1, out
        assert out["alive"] == set(), out
        assert out["write"] != "ok", out
        assert out["closed"] is True, out
    finally:
        destroy(c, vm["id"])
