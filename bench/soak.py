"""Soak: many tenants at once, for minutes, through the live API of a real `corral serve` on this host (its
own data dir, removed afterwards). The load the 2026-12 review ran (32 clients, 8 minutes).

    sudo .venv/bin/python -m bench.soak [--clients 32] [--minutes 8]

Each client is its own account and loops: create a VM and wait until it is ready, exec a command, upload a
64 KiB file, download it back (compared byte for byte), list its directory, destroy the VM. Every answer that
is not the expected one is an error (printed with its status and body). At the end: the cycle rate, p50/p99
per operation, the errors, and a leak check: no VM left in the API, no sandbox process, mount, network
namespace link or cgroup of the node left on the host, and the server's open file descriptors and threads
back near where they started.

Exit status 0 only with no error and no leak.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import Server, node_server, signup
from tests.vmtools import node_processes, public_key, unique_name

from bench.lifecycle import pct

PAYLOAD = 64 * 1024


@dataclass
class Tally:
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    cycles: int = 0
    live: set[str] = field(default_factory=set)  # created, not yet destroyed


class Failed(Exception):
    pass


def expect(resp: httpx.Response, status: int, what: str) -> httpx.Response:
    if resp.status_code != status:
        raise Failed(f"{what}: {resp.status_code} {resp.text[:300]}")
    return resp


async def timed(tally: Tally, op: str, call: asyncio.Future[httpx.Response] | object) -> httpx.Response:
    start = time.perf_counter()
    resp = await call  # type: ignore[misc]
    tally.times[op].append((time.perf_counter() - start) * 1000)
    assert isinstance(resp, httpx.Response)
    return resp


async def cycle(c: httpx.AsyncClient, key: str, tally: Tally) -> None:
    start = time.perf_counter()
    resp = await timed(
        tally, "create", c.post("/v1/vms", json={"name": unique_name("soak"), "public_key": key})
    )
    vm_id = expect(resp, 201, "create").json()["id"]
    tally.live.add(vm_id)
    try:
        while True:
            detail = expect(await c.get(f"/v1/vms/{vm_id}"), 200, "get").json()["status_detail"]
            if detail == "ready":
                break
            if detail == "failed":
                raise Failed(f"VM {vm_id} failed to start")
            await asyncio.sleep(0.02)
        tally.times["create_to_ready"].append((time.perf_counter() - start) * 1000)
        word = secrets.token_hex(4)
        resp = await timed(tally, "exec", c.post(f"/v1/vms/{vm_id}/exec", json={"command": f"echo {word}"}))
        body = expect(resp, 200, "exec").json()
        if body.get("exit_code") != 0 or body.get("stdout", "").strip() != word:
            raise Failed(f"exec answered {body}")
        data = os.urandom(PAYLOAD)
        resp = await timed(
            tally,
            "upload",
            c.post(f"/v1/vms/{vm_id}/files/upload", params={"path": "/root/soak/blob"}, content=data),
        )
        expect(resp, 201, "upload")
        resp = await timed(
            tally, "download", c.get(f"/v1/vms/{vm_id}/files/download", params={"path": "/root/soak/blob"})
        )
        if expect(resp, 200, "download").content != data:
            raise Failed("download differs from the upload")
        resp = await timed(tally, "list", c.get(f"/v1/vms/{vm_id}/files", params={"path": "/root/soak"}))
        names = [e["name"] for e in expect(resp, 200, "list").json()["data"]]
        if names != ["blob"]:
            raise Failed(f"listing answered {names}")
    finally:
        resp = await timed(tally, "stop", c.post(f"/v1/vms/{vm_id}/stop"))
        expect(resp, 200, "stop")
        resp = await timed(tally, "destroy", c.delete(f"/v1/vms/{vm_id}"))
        expect(resp, 204, "destroy")
        tally.live.discard(vm_id)
    tally.cycles += 1


async def client_loop(srv: Server, token: str, key: str, until: float, tally: Tally) -> None:
    async with httpx.AsyncClient(
        base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=60.0
    ) as c:
        while time.monotonic() < until:
            try:
                await cycle(c, key, tally)
            except (Failed, httpx.HTTPError) as exc:
                tally.errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)


def server_counts(pid: int) -> tuple[int, int]:
    """(open fds, threads) of the server process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return fds, threads


def leaks(srv: Server, tally: Tally) -> list[str]:
    found = [f"{len(tally.live)} VMs not destroyed"] if tally.live else []
    node_root = srv.data_dir / "node"
    node_id = (node_root / "node-id").read_text().strip()
    if procs := node_processes(node_root, node_id):
        found.append(f"{len(procs)} sandbox processes left")
    bundles = str(node_root / "bundles")
    if mounts := [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if bundles in ln]:
        found.append(f"{len(mounts)} sandbox mounts left")
    for parent in Path("/sys/fs/cgroup").glob(f"*/corral-{node_id}"):
        if children := [p for p in parent.iterdir() if p.is_dir()]:
            found.append(f"{len(children)} sandbox cgroups left in {parent.parent.name}")
    return found


async def soak(srv: Server, clients: int, seconds: float) -> tuple[Tally, float]:
    key = public_key()
    tokens = [signup(srv).token for _ in range(clients)]
    tally = Tally()
    until = time.monotonic() + seconds
    started = time.monotonic()
    await asyncio.gather(*(client_loop(srv, t, key, until, tally) for t in tokens))
    return tally, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=8.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, node_server(Path(tmp)) as srv:
        before = server_counts(srv.proc.pid)
        tally, elapsed = asyncio.run(soak(srv, args.clients, args.minutes * 60))
        time.sleep(2)  # let the last destroys' background work settle
        after = server_counts(srv.proc.pid)
        left = leaks(srv, tally)
        rss = int(Path(f"/proc/{srv.proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]) // 1024
    print(f"soak: {args.clients} clients, {elapsed:.0f} s, {platform.node()} ({os.cpu_count()} cores)")
    print(f"cycles {tally.cycles}   rate {tally.cycles / elapsed * 60:.1f}/min   errors {len(tally.errors)}")
    for op in ("create", "create_to_ready", "exec", "upload", "download", "list", "stop", "destroy"):
        values = tally.times.get(op, [])
        if values:
            print(
                f"  {op:<16} p50 {pct(values, 0.5):8.1f} ms   p99 {pct(values, 0.99):8.1f} ms   (n={len(values)})"
            )
    print(
        f"server fds {before[0]} -> {after[0]}, threads {before[1]} -> {after[1]}, RSS {rss} MiB at the end"
    )
    for err in tally.errors[:20]:
        print(f"  error: {err}")
    if after[0] > before[0] + 32:
        left.append(f"server fds grew from {before[0]} to {after[0]}")
    print("leaks: " + ("; ".join(left) if left else "none"))
    return 0 if not tally.errors and not left else 1


if __name__ == "__main__":
    raise SystemExit(main())
