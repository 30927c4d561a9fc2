"""File access for a tenant never exceeds what the sandbox's own root may do, on real sandboxes: kernel files
(the host's kernel log, kallsyms, pagemap, a process's kernel stack, slabinfo) are not handed out by the files
API or SFTP; the device nodes a sandbox sees are never changed on the host by SFTP attribute changes or an
upload; the server stays responsive meanwhile; listings come in pages."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import asyncssh
import httpx
import pytest

from tests.sandbox.test_access import key_file
from tests.support import Account, Server, signup
from tests.vmtools import create_ready, destroy, run

KERNEL_FILES = ("/proc/kmsg", "/proc/kallsyms", "/proc/1/pagemap", "/proc/1/stack", "/proc/slabinfo")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


@pytest.fixture(scope="module")
def account(node: Server) -> Iterator[Account]:
    acct = signup(node)
    yield acct
    acct.client.close()


@pytest.fixture(scope="module")
def vm(account: Account) -> Iterator[dict[str, Any]]:
    made = create_ready(account.client)
    yield made
    destroy(account.client, made["id"])


@pytest.fixture(scope="module")
def ssh_info(account: Account, vm: dict[str, Any]) -> dict[str, Any]:
    resp = account.client.get(f"/v1/vms/{vm['id']}/ssh")
    assert resp.status_code == 200, resp.text
    info: dict[str, Any] = resp.json()
    return info


async def _sftp_each(info: dict[str, Any], paths: tuple[str, ...], action: str) -> dict[str, str]:
    """For each path, what the SFTP server answered to ``action`` (the exception's name, or ``ok: <data>``)."""
    out: dict[str, str] = {}
    async with (
        asyncssh.connect(
            info["host"],
            info["port"],
            username=info["username"],
            client_keys=[key_file()],
            known_hosts=None,
        ) as conn,
        conn.start_sftp_client() as sftp,
    ):
        for path in paths:
            try:
                if action == "read":
                    async with sftp.open(path, "rb") as f:
                        out[path] = f"ok: {(await f.read(4096, 0))!r}"
                elif action == "chmod":
                    await sftp.chmod(path, 0o660)  # a change, yet harmless to root on the host
                    out[path] = "ok"
                elif action == "utime":
                    await sftp.utime(path, (978307200, 978307200))
                    out[path] = "ok"
                elif action == "chown":
                    await sftp.chown(path, 0, 0)
                    out[path] = "ok"
                elif action == "truncate":
                    await sftp.truncate(path, 0)
                    out[path] = "ok"
            except asyncssh.SFTPError as exc:
                out[path] = type(exc).__name__
    return out


def _host_inode(dev: str) -> tuple[int, int, int, int, int]:
    st = os.stat(f"/dev/{dev}")
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns


def test_kernel_files_are_not_handed_out(
    account: Account, vm: dict[str, Any], ssh_info: dict[str, Any]
) -> None:
    c, vm_id = account.client, vm["id"]
    # what the sandbox itself gets: no kernel log, no addresses, no kernel stack
    assert run(c, vm_id, "head -c 100 /proc/kmsg")["exit_code"] != 0
    assert run(c, vm_id, "cat /proc/1/stack")["exit_code"] != 0
    zeros = run(c, vm_id, "head -3 /proc/kallsyms | cut -c1-16 | sort -u")["stdout"].split()
    assert set(zeros) <= {"0000000000000000"}, zeros
    for path in KERNEL_FILES:
        got = c.get(f"/v1/vms/{vm_id}/files/download", params={"path": path}, timeout=15)
        assert got.status_code == 400, (path, got.status_code, got.text[:200])
        assert got.json()["error"]["code"] == "invalid_path", path
    answers = asyncio.run(_sftp_each(ssh_info, KERNEL_FILES, "read"))
    assert all(not answer.startswith("ok") for answer in answers.values()), answers


def test_the_server_answers_while_an_sftp_client_reads_kmsg(
    node: Server, account: Account, ssh_info: dict[str, Any]
) -> None:
    done = threading.Event()
    answers: list[dict[str, str]] = []

    def attack() -> None:
        while not done.is_set():
            answers.append(asyncio.run(_sftp_each(ssh_info, ("/proc/kmsg", "/proc/kmsg"), "read")))

    thread = threading.Thread(target=attack, daemon=True)
    thread.start()
    try:
        slowest = 0.0
        end = time.monotonic() + 3
        while time.monotonic() < end:
            started = time.monotonic()
            resp = httpx.get(f"{node.url}/healthz", timeout=1.0)  # a timeout here fails the test
            assert resp.status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
        assert slowest < 1.0
    finally:
        done.set()
        thread.join(30)
    assert answers, "the SFTP client never got an answer"
    assert all(not a.startswith("ok") for answer in answers for a in answer.values()), answers[:3]


@pytest.fixture
def host_devices() -> Iterator[dict[str, tuple[int, int, int, int, int]]]:
    """The host's device inodes as they were; put back (mode, owner, times) after the test whatever it did,
    so a failing run never leaves the host's /dev/null unusable."""
    before = {dev: _host_inode(dev) for dev in DEVICES}
    yield before
    for dev, (mode, uid, gid, mtime, _ctime) in before.items():
        now = _host_inode(dev)
        if now[:4] != (mode, uid, gid, mtime):
            os.chown(f"/dev/{dev}", uid, gid)
            os.chmod(f"/dev/{dev}", stat.S_IMODE(mode))
            os.utime(f"/dev/{dev}", ns=(mtime, mtime))


def test_device_nodes_never_change_on_the_host(
    account: Account,
    vm: dict[str, Any],
    ssh_info: dict[str, Any],
    host_devices: dict[str, tuple[int, int, int, int, int]],
) -> None:
    paths = tuple(f"/dev/{dev}" for dev in DEVICES)
    for action in ("chmod", "utime", "chown", "truncate"):
        answers = asyncio.run(_sftp_each(ssh_info, paths, action))
        assert all(a != "ok" for a in answers.values()), (action, answers)
        assert {dev: _host_inode(dev) for dev in DEVICES} == host_devices, action
    for path in paths:
        up = account.client.post(
            f"/v1/vms/{vm['id']}/files/upload", params={"path": path}, content=b"overwrite", timeout=15
        )
        assert 400 <= up.status_code < 500, (path, up.status_code, up.text)
        assert set(up.json()) == {"error"}
    assert {dev: _host_inode(dev) for dev in DEVICES} == host_devices
    # and the sandbox's own view of them still works
    out = run(account.client, vm["id"], "echo x > /dev/null && head -c 4 /dev/zero | od -An -tx1")
    assert out["exit_code"] == 0, out
    assert out["stdout"].split() == ["00", "00", "00", "00"]


def test_a_big_directory_is_listed_in_pages(account: Account, vm: dict[str, Any]) -> None:
    c, vm_id = account.client, vm["id"]
    made = run(c, vm_id, "mkdir -p /root/many && cd /root/many && seq -f 'entry-%05g' 1 5000 | xargs touch")
    assert made["exit_code"] == 0, made
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"path": "/root/many", "limit": 700}
        if cursor is not None:
            params["cursor"] = cursor
        resp = c.get(f"/v1/vms/{vm_id}/files", params=params)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert len(body["data"]) <= 700
        seen += [e["name"] for e in body["data"]]
        pages += 1
        if not body["has_more"]:
            assert body["cursor"] is None
            break
        cursor = body["cursor"]
    assert pages == 8
    assert seen == [f"entry-{i:05d}" for i in range(1, 5001)]  # each once, by name
    first = c.get(f"/v1/vms/{vm_id}/files", params={"path": "/root/many"}).json()
    assert len(first["data"]) == 1000  # the default page
    assert first["has_more"] is True
    cases: list[tuple[dict[str, Any], str]] = [
        ({"path": "/root/many", "limit": 0}, "invalid_parameter"),
        ({"path": "/root/many", "limit": 10001}, "invalid_parameter"),
        ({"path": "/root/many", "cursor": "not-a-cursor"}, "invalid_cursor"),
        ({"path": "/root", "cursor": first["cursor"]}, "invalid_cursor"),
    ]
    for params, code in cases:
        bad = c.get(f"/v1/vms/{vm_id}/files", params=params)
        assert bad.status_code == 400, (params, bad.text)
        assert bad.json()["error"]["code"] == code, (params, bad.text)


def test_a_full_page_of_the_longest_names_is_listed(account: Account, vm: dict[str, Any]) -> None:
    """Review 2 L4: the documented maximum page (10000) of 255-byte names answers 200 in one page (it
    answered 503 with a traceback: the worker's reply overflowed its frame)."""
    c, vm_id = account.client, vm["id"]
    made = run(
        c, vm_id, "mkdir -p /root/long && cd /root/long && seq -f '%0255g' 1 10000 | xargs touch && echo ok"
    )
    assert made["stdout"].strip() == "ok", made
    try:
        resp = c.get(f"/v1/vms/{vm_id}/files", params={"path": "/root/long", "limit": 10_000}, timeout=60)
        assert resp.status_code == 200, resp.text[:300]
        body = resp.json()
        assert len(body["data"]) == 10_000
        assert body["has_more"] is False
        assert {len(e["name"]) for e in body["data"]} == {255}
    finally:
        run(c, vm_id, "rm -rf /root/long")


def _stalled_upload(srv: Server, token: str, vm_id: str, n: int) -> socket.socket:
    """An upload that sends one byte of its body, then nothing."""
    url = urlsplit(srv.url)
    assert url.hostname is not None
    assert url.port is not None
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    head = (
        f"POST /v1/vms/{vm_id}/files/upload?path=/root/stalled-{n} HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
        "Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n"
    )
    sock.sendall(head.encode())
    return sock


def test_uploads_are_capped_per_vm_and_stalled_ones_leave_nothing(
    node: Server, account: Account, vm: dict[str, Any]
) -> None:
    c, vm_id = account.client, vm["id"]
    stalls = [_stalled_upload(node, account.token, vm_id, n) for n in range(8)]  # the per-VM cap
    try:
        time.sleep(1.5)  # the server takes them in (each holds its slot while it waits for the body)
        resp = c.post(f"/v1/vms/{vm_id}/files/upload", params={"path": "/root/ninth"}, content=b"9")
        assert resp.status_code == 429, resp.text
        assert resp.json()["error"]["code"] == "too_many_concurrent"
        assert int(resp.headers["retry-after"]) >= 1
        # listings and downloads have slots of their own
        assert c.get(f"/v1/vms/{vm_id}/files", params={"path": "/root"}).status_code == 200
    finally:
        for sock in stalls:
            sock.close()
    deadline = time.monotonic() + 15
    while True:  # the slots come back as the connections close
        resp = c.post(f"/v1/vms/{vm_id}/files/upload", params={"path": "/root/after"}, content=b"after")
        if resp.status_code == 201 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert resp.status_code == 201, resp.text
    left = run(c, vm_id, "ls -A /root | grep -E '^(stalled-|\\.corral-upload-)' || true")["stdout"]
    deadline = time.monotonic() + 10
    while left.strip() and time.monotonic() < deadline:  # each worker removes its upload as it ends
        time.sleep(0.2)
        left = run(c, vm_id, "ls -A /root | grep -E '^(stalled-|\\.corral-upload-)' || true")["stdout"]
    assert left.strip() == "", left
