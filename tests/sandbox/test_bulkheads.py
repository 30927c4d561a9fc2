"""Bulkheads on a real server: one tenant's long operations cannot starve another's (issue 13: H3, H4, L4).

- Hundreds of long execs from one key: most are refused (429 ``too_many_concurrent``), the rest hold no worker
  thread, another tenant's requests and execs answer at once, and the commands die when their client leaves.
- Stalled uploads fill asyncio's default executor: SSH logins and terminals use pools of their own.
- Idle TCP connections to the SSH port beyond the per-source cap are closed; a real login still works.
- Terminals, shells and SSH sessions share a per-VM cap.

The server runs with fewer worker threads than the attack has requests (CORRAL_MAX_CONCURRENT_REQUESTS=48,
the pre-fix exhaustion at a tenth of the review's 540 requests) and a small pre-auth cap."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.sandbox.test_access import ssh_argv
from tests.support import Account, Server, node_server, signup, wait_until
from tests.vmtools import create_ready, destroy, run

PREAUTH_PER_SOURCE = 8
SESSIONS_PER_VM = 4
EXECS_PER_VM = 16  # the default


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with node_server(
        tmp_path_factory.mktemp("bulkheads"),
        CORRAL_MAX_CONCURRENT_REQUESTS="48",
        CORRAL_SSH_PREAUTH_PER_SOURCE=str(PREAUTH_PER_SOURCE),
        CORRAL_MAX_SESSIONS_PER_VM=str(SESSIONS_PER_VM),
        CORRAL_NETWORK="off",
    ) as server:
        yield server


@pytest.fixture(scope="module")
def attacker(srv: Server) -> Iterator[tuple[Account, dict[str, Any]]]:
    acct = signup(srv, first_name="Mallory")
    vm = create_ready(acct.client)
    yield acct, vm
    destroy(acct.client, vm["id"])
    acct.client.close()


@pytest.fixture(scope="module")
def victim(srv: Server) -> Iterator[tuple[Account, dict[str, Any]]]:
    acct = signup(srv, first_name="Bob")
    vm = create_ready(acct.client)
    yield acct, vm
    destroy(acct.client, vm["id"])
    acct.client.close()


@pytest.fixture(scope="module")
def victim_ssh(
    victim: tuple[Account, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    acct, vm = victim
    info: dict[str, Any] = acct.client.get(f"/v1/vms/{vm['id']}/ssh").json()
    known = tmp_path_factory.mktemp("ssh") / "known_hosts"
    known.write_text(f"[{info['host']}]:{info['port']} {info['host_key']}\n")
    info["known_hosts"] = str(known)
    return info


# ---- raw HTTP, so hundreds of requests cost one socket each -------------------------------------------------


def _address(srv: Server) -> tuple[str, int]:
    url = urlsplit(srv.url)
    assert url.hostname is not None
    assert url.port is not None
    return url.hostname, url.port


def _send(srv: Server, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(_address(srv), timeout=10)
    sock.sendall(head.encode() + body)
    return sock


def _exec_request(
    srv: Server, token: str, vm_id: str, command: str, *, stream: bool = False
) -> socket.socket:
    body = json.dumps({"command": command, "timeout": 600}).encode()
    path = f"/v1/vms/{vm_id}/exec" + ("/stream" if stream else "")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return _send(srv, head, body)


def _answers(socks: list[socket.socket], wait_s: float) -> dict[socket.socket, bytes]:
    """The first bytes each socket answered within ``wait_s`` (those that answered nothing are left out)."""
    got: dict[socket.socket, bytes] = {}
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ, s)
        end = time.monotonic() + wait_s
        while len(got) < len(socks) and (left := end - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                ready: socket.socket = key.data
                got[ready] = ready.recv(65536)
                sel.unregister(ready)
    return got


def _vm_processes(vm_id: str, cmdline: bytes) -> int:
    """How many processes of the VM (its cgroup, seen from the host) run exactly ``cmdline``."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if vm_id in Path(f"/proc/{pid}/cgroup").read_text() and (
                Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline
            ):
                count += 1
    return count


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    start = time.monotonic()
    out = fn(*args, **kwargs)
    return time.monotonic() - start, out


# ---- H3: long execs ------------------------------------------------------------------------------------------


def test_hundreds_of_long_execs_starve_nobody_and_die_with_their_client(
    srv: Server, attacker: tuple[Account, dict[str, Any]], victim: tuple[Account, dict[str, Any]]
) -> None:
    acct, vm = attacker
    bob, bob_vm = victim
    socks = [_exec_request(srv, acct.token, vm["id"], "sleep 60") for _ in range(200)]
    try:
        answered = _answers(socks, 10.0)
        refused = [a for a in answered.values() if a.startswith(b"HTTP/1.1 429 ")]
        assert len(refused) == 200 - EXECS_PER_VM, [a[:200] for a in answered.values()][:3]
        assert all(b"\r\nretry-after: " in a.lower() for a in refused)
        wait_until(lambda: _vm_processes(vm["id"], b"sleep\x0060\x00") == EXECS_PER_VM, timeout=10)
        # another tenant, meanwhile: its reads and its own exec answer at once
        elapsed, resp = _timed(bob.client.get, "/v1/vms", timeout=5)
        assert resp.status_code == 200
        assert elapsed < 2, f"GET /v1/vms took {elapsed:.2f} s during the attack"
        elapsed, out = _timed(run, bob.client, bob_vm["id"], "echo ok")
        assert out["stdout"] == "ok\n"
        assert elapsed < 2, f"another tenant's exec took {elapsed:.2f} s during the attack"
        assert _vm_processes(vm["id"], b"sleep\x0060\x00") == EXECS_PER_VM  # still running
    finally:
        for s in socks:
            s.close()
    # the attacker's client is gone: its commands are killed (seen from the host, then from the VM)
    wait_until(lambda: _vm_processes(vm["id"], b"sleep\x0060\x00") == 0, timeout=10)
    left = run(acct.client, vm["id"], "ps -eo args= | grep -c '^sleep 60$' || true")
    assert left["stdout"] == "0\n", left


def test_a_stream_that_is_left_kills_its_command_and_frees_its_slot(
    srv: Server, attacker: tuple[Account, dict[str, Any]]
) -> None:
    acct, vm = attacker
    streams = [_exec_request(srv, acct.token, vm["id"], "sleep 61", stream=True) for _ in range(EXECS_PER_VM)]
    try:
        heads = _answers(streams, 10.0)
        assert len(heads) == EXECS_PER_VM
        assert all(h.startswith(b"HTTP/1.1 200 ") for h in heads.values())
        wait_until(lambda: _vm_processes(vm["id"], b"sleep\x0061\x00") == EXECS_PER_VM, timeout=10)
        # the VM's slots are full: one more is refused
        resp = acct.client.post(f"/v1/vms/{vm['id']}/exec", json={"command": "true"})
        assert resp.status_code == 429, resp.text
        assert resp.json()["error"]["code"] == "too_many_concurrent"
        assert int(resp.headers["retry-after"]) >= 1
    finally:
        for s in streams:
            s.close()
    wait_until(lambda: _vm_processes(vm["id"], b"sleep\x0061\x00") == 0, timeout=10)
    wait_until(
        lambda: acct.client.post(f"/v1/vms/{vm['id']}/exec", json={"command": "true"}).status_code == 200,
        timeout=10,
    )


# ---- H4: stalled uploads and SSH -----------------------------------------------------------------------------


def _stalled_upload(srv: Server, token: str, vm_id: str, n: int) -> socket.socket:
    head = (
        f"POST /v1/vms/{vm_id}/files/upload?path=/root/stalled-{n} HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    return _send(srv, head, b"1\r\nx\r\n")  # one byte, then nothing


def test_stalled_uploads_do_not_block_ssh_logins_or_terminals(
    srv: Server,
    attacker: tuple[Account, dict[str, Any]],
    victim: tuple[Account, dict[str, Any]],
    victim_ssh: dict[str, Any],
) -> None:
    acct, vm = attacker
    bob, bob_vm = victim
    stalls = [_stalled_upload(srv, acct.token, vm["id"], n) for n in range(12)]
    try:
        time.sleep(0.5)  # the server has taken them in
        argv = ssh_argv(victim_ssh, f"{victim_ssh['username']}@{victim_ssh['host']}", "echo logged-in")
        try:
            done = subprocess.run(argv, capture_output=True, timeout=15, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail("the SSH login did not finish in 15 s while uploads were stalled")
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"logged-in\n"
        host, port = _address(srv)
        url = f"ws://{host}:{port}/v1/vms/{bob_vm['id']}/terminal"
        with connect(url, additional_headers={"Authorization": f"Bearer {bob.token}"}, open_timeout=10) as ws:
            ws.send("echo term-$((6*7))\n")
            assert "term-42" in _read_until(ws, "term-42", 10)
    finally:
        for s in stalls:
            s.close()


def _read_until(ws: ClientConnection, text: str, wait_s: float) -> str:
    seen = ""
    end = time.monotonic() + wait_s
    while text not in seen and time.monotonic() < end:
        with contextlib.suppress(TimeoutError):
            frame = ws.recv(timeout=max(0.01, end - time.monotonic()))
            seen += frame.decode(errors="replace") if isinstance(frame, bytes) else frame
    return seen


# ---- L4: SSH pre-authentication cap --------------------------------------------------------------------------


def _closed_within(sock: socket.socket, wait_s: float) -> bool:
    """Whether the server closed ``sock`` within ``wait_s`` (after whatever it sent first)."""
    sock.settimeout(wait_s)
    end = time.monotonic() + wait_s
    try:
        while time.monotonic() < end:
            if not sock.recv(4096):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


def test_idle_ssh_connections_beyond_the_per_source_cap_are_closed(
    victim_ssh: dict[str, Any],
) -> None:
    idle: list[socket.socket] = []
    try:
        for _ in range(PREAUTH_PER_SOURCE + 12):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))  # another source address than the legitimate client's
            s.connect((victim_ssh["host"], victim_ssh["port"]))
            idle.append(s)
            time.sleep(0.01)  # in order: the first ones take the slots
        closed = [_closed_within(s, 0.5) for s in idle]
        assert closed == [False] * PREAUTH_PER_SOURCE + [True] * 12
        argv = ssh_argv(victim_ssh, f"{victim_ssh['username']}@{victim_ssh['host']}", "echo still-in")
        done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"still-in\n"
    finally:
        for s in idle:
            s.close()
    # the slots are given back when the connections go: a new one from that address is served
    wait_until(lambda: not _closed_after_banner(victim_ssh), timeout=10)


def _closed_after_banner(info: dict[str, Any]) -> bool:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        s.connect((info["host"], info["port"]))
        return _closed_within(s, 0.5)


# ---- sessions: one per-VM cap for terminals, shells and SSH ---------------------------------------------------


def test_terminals_shells_and_ssh_sessions_share_a_per_vm_cap(
    srv: Server, victim: tuple[Account, dict[str, Any]], victim_ssh: dict[str, Any]
) -> None:
    bob, bob_vm = victim
    host, port = _address(srv)
    base = f"ws://{host}:{port}/v1/vms/{bob_vm['id']}"
    auth = {"Authorization": f"Bearer {bob.token}"}
    opened: list[ClientConnection] = []
    try:
        for kind in ["terminal", "shell"] * (SESSIONS_PER_VM // 2):
            opened.append(connect(f"{base}/{kind}", additional_headers=auth, open_timeout=10))
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{base}/terminal", additional_headers=auth, open_timeout=10)
        assert refused.value.response.status_code == 429
        assert json.loads(refused.value.response.body or b"{}")["error"]["code"] == "too_many_concurrent"
        assert refused.value.response.headers["retry-after"]
        argv = ssh_argv(victim_ssh, f"{victim_ssh['username']}@{victim_ssh['host']}", "true")
        done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        assert done.returncode == 255
        assert b"too many sessions" in done.stderr
    finally:
        for ws in opened:
            ws.close()
    # the sessions are closed: SSH gets in again
    argv = ssh_argv(victim_ssh, f"{victim_ssh['username']}@{victim_ssh['host']}", "echo back")
    wait_until(
        lambda: subprocess.run(argv, capture_output=True, timeout=30, check=False).stdout == b"back\n",
        timeout=15,
    )
