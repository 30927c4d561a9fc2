"""Sandbox state benchmark: snapshot, restore (a new VM from a snapshot), hibernate, resume and fork, for an
idle sandbox and for one holding 256 MiB of process memory; the disk used per snapshot; the time to fork 10
children. Everything goes through the live HTTP API of a real `corral serve` on this host (its own data dir,
removed afterwards), with CRIU and crun as `make install` builds them.

    sudo .venv/bin/python -m bench.state [--runs 10] [--runtime crun]

Times are client-visible: from the request to the answer (hibernate, resume, fork: the answer comes when the
VM is hibernated / running); snapshot: from the request until it is `ready`; restore: from POST /v1/vms with
`snapshot_id` until the VM is `ready`. Targets on the reference 2-core machine: hibernate and resume of an idle
sandbox p50 <= 150 ms each, fork to a running child p50 <= 150 ms, 10 children <= 1 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import node_server, signup
from tests.vmtools import public_key, unique_name

from bench.lifecycle import line

HOG = (
    "nohup python3 -c 'import time; b = bytearray(256 << 20); "
    "[b.__setitem__(i, 1) for i in range(0, len(b), 4096)]; time.sleep(10**6)' >/dev/null 2>&1 &"
)


def ready(c: httpx.Client, vm_id: str) -> dict[str, Any]:
    while True:
        vm: dict[str, Any] = c.get(f"/v1/vms/{vm_id}").json()
        if vm["status_detail"] in ("ready", "failed"):
            if vm["status_detail"] != "ready":
                raise RuntimeError(f"VM did not become ready: {vm}")
            return vm
        time.sleep(0.002)


def create(c: httpx.Client, key: str, **fields: Any) -> str:
    r = c.post("/v1/vms", json={"name": unique_name("bench"), "public_key": key, **fields})
    r.raise_for_status()
    return str(ready(c, r.json()["id"])["id"])


def destroy(c: httpx.Client, vm_id: str) -> None:
    vm = c.get(f"/v1/vms/{vm_id}").json()
    if vm["status"] == "running":
        c.post(f"/v1/vms/{vm_id}/stop").raise_for_status()
    c.delete(f"/v1/vms/{vm_id}").raise_for_status()


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn(*args)
    return (time.perf_counter() - t) * 1000, out


def post_ok(c: httpx.Client, path: str, body: dict[str, Any] | None = None) -> Any:
    r = c.post(path, json=body)
    if r.status_code >= 300:
        raise RuntimeError(f"{path}: {r.status_code} {r.text}")
    return r.json()


def snapshot_ready(c: httpx.Client, vm_id: str) -> dict[str, Any]:
    snap = post_ok(c, f"/v1/vms/{vm_id}/snapshots")["data"]
    while snap["status"] not in ("ready", "failed"):
        time.sleep(0.002)
        snap = c.get(f"/v1/snapshots/{snap['id']}").json()["data"]
    if snap["status"] != "ready":
        raise RuntimeError(f"snapshot failed: {snap}")
    return dict(snap)


def measure(c: httpx.Client, key: str, runs: int, hog: bool) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        k: [] for k in ("snapshot", "restore", "hibernate", "resume", "fork", "disk")
    }
    mem = 512 if hog else 256
    vm_id = create(c, key, mem_mib=mem)
    try:
        if hog:
            post_ok(c, f"/v1/vms/{vm_id}/exec", {"command": HOG})
            time.sleep(3)  # the 256 MiB are touched
        for _ in range(runs):
            ms, _ = timed(post_ok, c, f"/v1/vms/{vm_id}/hibernate")
            out["hibernate"].append(ms)
            ms, _ = timed(post_ok, c, f"/v1/vms/{vm_id}/resume")
            out["resume"].append(ms)
            ms, kids = timed(post_ok, c, f"/v1/vms/{vm_id}/fork", {"count": 1})
            out["fork"].append(ms)
            destroy(c, kids["data"][0]["id"])
            ms, snap = timed(snapshot_ready, c, vm_id)
            out["snapshot"].append(ms)
            out["disk"].append(float(snap["size_bytes"]))
            t = time.perf_counter()
            r = c.post(
                "/v1/vms", json={"name": unique_name("bench"), "public_key": key, "snapshot_id": snap["id"]}
            )
            r.raise_for_status()
            new = ready(c, r.json()["id"])
            out["restore"].append((time.perf_counter() - t) * 1000)
            destroy(c, new["id"])
            c.delete(f"/v1/snapshots/{snap['id']}").raise_for_status()
    finally:
        destroy(c, vm_id)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--runtime", default="crun", choices=("crun", "runc"))
    args = parser.parse_args()
    key = public_key()
    print(f"# Corral state benchmark, {time.strftime('%Y-%m-%d %H:%M')} UTC")
    print(f"# host: {platform.node()}, {platform.platform()}, {os.cpu_count()} cores, runtime {args.runtime}")
    with (
        tempfile.TemporaryDirectory() as tmp,
        node_server(Path(tmp), CORRAL_RUNTIME=args.runtime) as srv,
    ):
        acct = signup(srv)
        c = acct.client
        c.timeout = httpx.Timeout(300.0)
        warm = create(c, key)  # warm up (the runtime, CRIU's kernel probe cache, the image's page cache)
        post_ok(c, f"/v1/vms/{warm}/hibernate")
        post_ok(c, f"/v1/vms/{warm}/resume")
        destroy(c, warm)
        for label, hog in (("idle", False), ("256 MiB", True)):
            got = measure(c, key, args.runs, hog)
            for op in ("snapshot", "restore", "hibernate", "resume", "fork"):
                print(line(f"{op}, {label}", got[op]))
            disk = statistics.median(got["disk"]) / (1 << 20)
            print(f"{'disk per snapshot, ' + label:<42} {disk:7.1f} MiB (stored: disk layer + memory images)")
        src = create(c, key, mem_mib=256)
        forks = []
        for _ in range(max(1, args.runs // 3)):
            ms, kids = timed(post_ok, c, f"/v1/vms/{src}/fork", {"count": 10})
            assert all(k["status_detail"] == "ready" for k in kids["data"]), kids
            forks.append(ms)
            for k in kids["data"]:
                destroy(c, k["id"])
        destroy(c, src)
        print(line("fork 10 children (all running)", forks))
        c.close()


if __name__ == "__main__":
    main()
