"""Sandbox lifecycle benchmark: create-to-ready (warm pool and cold), exec round trip, stop and destroy,
and host memory per idle sandbox at 200 sandboxes. Everything goes through the live HTTP API of a real
`corral serve` on this host (its own data dir, removed afterwards).

    sudo .venv/bin/python -m bench.lifecycle [--runs 40] [--idle 200]

Targets on the reference 2-core machine: create-to-ready p50 <= 10 ms from the pool and <= 60 ms cold, exec
p50 <= 10 ms, 200 idle sandboxes under 2 MiB of host memory each.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import node_server, signup
from tests.vmtools import public_key, unique_name


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def line(label: str, values: list[float], unit: str = "ms") -> str:
    return (
        f"{label:<42} p50 {statistics.median(values):7.1f} {unit}   p95 {pct(values, 0.95):7.1f} {unit}"
        f"   (n={len(values)})"
    )


def create_to_ready(client: httpx.Client, key: str, **fields: Any) -> tuple[float, int | None, str]:
    start = time.perf_counter()
    resp = client.post("/v1/vms", json={"name": unique_name("bench"), "public_key": key, **fields})
    resp.raise_for_status()
    vm_id = resp.json()["id"]
    while True:
        vm = client.get(f"/v1/vms/{vm_id}").json()
        if vm["status_detail"] in ("ready", "failed"):
            break
    elapsed = (time.perf_counter() - start) * 1000
    if vm["status_detail"] != "ready":
        raise RuntimeError(f"VM did not become ready: {vm}")
    return elapsed, vm.get("create_ms"), vm_id


def stop_destroy(client: httpx.Client, vm_id: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    client.post(f"/v1/vms/{vm_id}/stop").raise_for_status()
    t1 = time.perf_counter()
    client.delete(f"/v1/vms/{vm_id}").raise_for_status()
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def mem_used_kib() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])


def settle() -> None:
    subprocess.run(["sync"], check=False)
    time.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--runtime", default="crun", choices=("crun", "runc"))
    args = parser.parse_args()
    key = public_key()
    print(f"# Corral lifecycle benchmark, {time.strftime('%Y-%m-%d %H:%M')} UTC")
    print(
        f"# host: {platform.node()}, {platform.platform()}, {__import__('os').cpu_count()} cores, runtime {args.runtime}"
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        node_server(
            Path(tmp),
            CORRAL_WARM_POOL_SIZE="4",
            CORRAL_RUNTIME=args.runtime,
            # one account holds every idle sandbox: quotas and admission sized for --idle of them
            CORRAL_QUOTA_VMS=str(args.idle + 50),
            CORRAL_QUOTA_VCPUS=str(args.idle + 50),
            CORRAL_QUOTA_MEM_MIB=str((args.idle + 50) * 1024),
            CORRAL_QUOTA_DISK_MIB=str((args.idle + 50) * 4096),
            CORRAL_OVERCOMMIT_VCPUS="100",
            CORRAL_OVERCOMMIT_MEM="100",
            CORRAL_OVERCOMMIT_DISK="100",
        ) as srv,
    ):
        acct = signup(srv)
        c = acct.client
        c.timeout = httpx.Timeout(120.0)
        # warm up (first exec of a runtime, the image's page cache)
        _, _, warm = create_to_ready(c, key, vcpus=1, mem_mib=512)
        stop_destroy(c, warm)

        pooled, pooled_server, cold, cold_server, execs, stops, destroys = [], [], [], [], [], [], []
        for _ in range(args.runs):
            time.sleep(0.4)  # the pool refills (one boot, ~40-60 ms) before the next create and the execs
            ms, server_ms, vm_id = create_to_ready(c, key)
            time.sleep(0.4)  # and after the hand-over, so the refill does not run during the execs
            pooled.append(ms)
            pooled_server.append(float(server_ms or 0))
            for _ in range(5):
                t = time.perf_counter()
                r = c.post(f"/v1/vms/{vm_id}/exec", json={"command": ["true"]})
                execs.append((time.perf_counter() - t) * 1000)
                assert r.json()["exit_code"] == 0, r.text
            s, d = stop_destroy(c, vm_id)
            stops.append(s)
            destroys.append(d)
        raw = []
        state = srv.data_dir / "node" / "state"
        _, _, probe = create_to_ready(c, key)
        for _ in range(50):
            t = time.perf_counter()
            subprocess.run(
                ["crun", "--root", str(state), "exec", "--no-new-privs", probe, "true"], check=True
            )
            raw.append((time.perf_counter() - t) * 1000)
        stop_destroy(c, probe)
        for _ in range(args.runs):
            # a non-default size never comes from the pool: a cold boot
            ms, server_ms, vm_id = create_to_ready(c, key, mem_mib=768)
            cold.append(ms)
            cold_server.append(float(server_ms or 0))
            s, d = stop_destroy(c, vm_id)
            stops.append(s)
            destroys.append(d)
        print(line("create-to-ready, warm pool (client)", pooled))
        print(line("create-to-ready, warm pool (server create_ms)", pooled_server))
        print(line("create-to-ready, cold (client)", cold))
        print(line("create-to-ready, cold (server create_ms)", cold_server))
        print(line("exec `true` round trip (API)", execs))
        print(line("  of which the runtime alone (crun exec)", raw))
        print(line("stop", stops))
        print(line("destroy", destroys))

        settle()
        before = mem_used_kib()
        ids: list[str] = []
        with ThreadPoolExecutor(max_workers=4) as pool:
            for _, _, vm_id in pool.map(lambda _: create_to_ready(c, key, mem_mib=256), range(args.idle)):
                ids.append(vm_id)
        settle()
        after = mem_used_kib()
        per = (after - before) / len(ids) / 1024
        print(
            f"{'host memory per idle sandbox':<42} {per:7.2f} MiB   ({len(ids)} sandboxes, MemTotal-MemAvailable)"
        )
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda vm_id: stop_destroy(c, vm_id), ids))
        c.close()


if __name__ == "__main__":
    main()
