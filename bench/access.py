"""Access benchmark: what getting into a sandbox costs. A real `corral serve` on this host (its own data dir,
removed afterwards), one VM running a small web server bound to the sandbox's 127.0.0.1.

    sudo .venv/bin/python -m bench.access [--runs 300]

Proxy: a small GET (a 13-byte file from `python3 -m http.server`) through `/v1/vms/{id}/proxy/{port}/`, from
the request to the whole answer, with an HTTP/1.1 client kept alive to the API server; and the same request
made directly to the guest from this process, over a fresh connection made in the sandbox's network namespace
(`guest_socket`). The proxy opens a fresh connection to the guest for every request (it keeps none), so both
sides pay one connection to the guest per request; the difference is the API server: authentication, the
VM's lookup, the relay. Target: proxy p50 within a few ms of direct. The same GET on the proxy's own origin
(what a browser uses: `http://<port>-<vm>.localhost:<proxy port>/`, a ticket from
`POST /v1/vms/{id}/proxy-ticket` traded for a cookie once, then the cookie), kept alive too.

SSH: OpenSSH's `ssh` with the VM's key running `echo x` through the gateway, a new connection each time: from
starting the client to the first byte of output (what a user waits for), and to its exit.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import Server, node_server, signup
from tests.vmtools import _KEY_DIR as KEY_DIR
from tests.vmtools import node_processes, public_key, unique_name

from bench.lifecycle import line
from corral.node.guestnet import guest_socket

GUEST_PORT = 8123
BODY = b"hello, guest\n"
SERVE = f"python3 -m http.server {GUEST_PORT} --bind 127.0.0.1"


def ready_vm(c: httpx.Client) -> str:
    r = c.post("/v1/vms", json={"name": unique_name("bench"), "public_key": public_key()})
    r.raise_for_status()
    vm_id = str(r.json()["id"])
    while (detail := c.get(f"/v1/vms/{vm_id}").json()["status_detail"]) != "ready":
        if detail == "failed":
            raise RuntimeError("the VM failed to start")
        time.sleep(0.005)
    return vm_id


def start_guest_server(c: httpx.Client, vm_id: str) -> None:
    command = (
        f"mkdir -p /root/www && printf '{BODY.decode().strip()}\\n' > /root/www/index.txt && "
        f"cd /root/www && nohup {SERVE} >/dev/null 2>&1 &"
    )
    c.post(f"/v1/vms/{vm_id}/exec", json={"command": command}).raise_for_status()
    deadline = time.monotonic() + 20
    while c.get(f"/v1/vms/{vm_id}/proxy/{GUEST_PORT}/index.txt").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the guest's web server did not start")
        time.sleep(0.05)


def guest_pid(srv: Server) -> int:
    """The host PID of the web server inside the sandbox (any process in its network namespace will do)."""
    node_root = srv.data_dir / "node"
    node_id = (node_root / "node-id").read_text().strip()
    for pid in node_processes(node_root, node_id):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        if b" ".join(args).decode(errors="replace") == SERVE:
            return pid
    raise RuntimeError("the guest's web server is not running")


def direct_get(pid: int) -> bytes:
    """GET /index.txt straight from the guest's server, over a fresh connection in its namespace."""
    with guest_socket(pid, "127.0.0.1", GUEST_PORT, 5.0) as sock:
        sock.sendall(b"GET /index.txt HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def measure_proxy(srv: Server, c: httpx.Client, vm_id: str, runs: int) -> dict[str, list[float]]:
    """Milliseconds per request: ``proxy`` (through the API), ``direct`` (to the guest) and, for scale,
    ``api`` (``GET /v1/vms/{id}``: authentication and a lookup, nothing relayed), interleaved so all see the
    same machine."""
    pid = guest_pid(srv)
    url = f"/v1/vms/{vm_id}/proxy/{GUEST_PORT}/index.txt"
    out: dict[str, list[float]] = {"proxy": [], "direct": [], "api": []}
    for _ in range(20):  # warm up both paths
        c.get(url)
        direct_get(pid)
    for _ in range(runs):
        t = time.perf_counter()
        r = c.get(url)
        out["proxy"].append((time.perf_counter() - t) * 1000)
        if r.status_code != 200 or r.content != BODY:
            raise RuntimeError(f"proxy: {r.status_code} {r.content!r}")
        t = time.perf_counter()
        raw = direct_get(pid)
        out["direct"].append((time.perf_counter() - t) * 1000)
        if not raw.endswith(b"\r\n\r\n" + BODY):
            raise RuntimeError(f"direct: {raw!r}")
        t = time.perf_counter()
        c.get(f"/v1/vms/{vm_id}").raise_for_status()
        out["api"].append((time.perf_counter() - t) * 1000)
    return out


def origin_client(c: httpx.Client, vm_id: str) -> httpx.Client:
    """A client of the VM port's proxy origin, holding the cookie its ticket was traded for (it connects to
    the proxy's loopback port and names the VM's host, so the system resolver need not know *.localhost)."""
    r = c.post(f"/v1/vms/{vm_id}/proxy-ticket", json={"port": GUEST_PORT, "path": "/index.txt"})
    r.raise_for_status()
    url = urlsplit(r.json()["url"])
    host = {"Host": f"{url.hostname}:{url.port}"}
    o = httpx.Client(base_url=f"http://127.0.0.1:{url.port}", headers=host, timeout=30.0)
    opened = o.get(f"{url.path}?{url.query}")
    if opened.status_code != 303:
        raise RuntimeError(f"ticket: {opened.status_code} {opened.text}")
    o.headers["Cookie"] = opened.headers["set-cookie"].split(";", 1)[0]
    o.cookies.clear()
    return o


def measure_origin(c: httpx.Client, vm_id: str, runs: int) -> list[float]:
    """Milliseconds per GET on the proxy's own origin, with the cookie (a kept-alive connection)."""
    out: list[float] = []
    o = origin_client(c, vm_id)
    try:
        for _ in range(20):
            o.get("/index.txt")
        for _ in range(runs):
            t = time.perf_counter()
            r = o.get("/index.txt")
            out.append((time.perf_counter() - t) * 1000)
            if r.status_code != 200 or r.content != BODY:
                raise RuntimeError(f"origin: {r.status_code} {r.content!r}")
    finally:
        o.close()
    return out


def measure_ssh(c: httpx.Client, vm_id: str, known_hosts: Path, runs: int) -> dict[str, list[float]]:
    """OpenSSH's client running `ssh VM 'echo x'`, one connection each: from starting it to the first byte of
    the command's output (TCP connect, key exchange, public-key login, session and command start in the
    sandbox), and to its exit."""
    info = c.get(f"/v1/vms/{vm_id}/ssh").json()
    known_hosts.write_text(f"[{info['host']}]:{info['port']} {info['host_key']}\n")
    argv = ["ssh", "-i", str(KEY_DIR / "id_ed25519"), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"]
    argv += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes"]
    argv += ["-p", str(info["port"]), f"{info['username']}@{info['host']}", "echo x"]
    first: list[float] = []
    whole: list[float] = []
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        byte = os.read(proc.stdout.fileno(), 1)
        first.append((time.perf_counter() - t) * 1000)
        proc.wait()
        whole.append((time.perf_counter() - t) * 1000)
        if byte != b"x" or proc.returncode != 0:
            raise RuntimeError(f"ssh did not run the command (exit {proc.returncode})")
    return {"first_byte": first, "exit": whole}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    print(f"# Corral access benchmark, {time.strftime('%Y-%m-%d %H:%M')} UTC")
    print(f"# host: {platform.node()}, {platform.platform()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp, node_server(Path(tmp)) as srv:
        acct = signup(srv)
        c = acct.client
        vm_id = ready_vm(c)
        try:
            start_guest_server(c, vm_id)
            got = measure_proxy(srv, c, vm_id, args.runs)
            print(line("proxy GET (13 B), through the API", got["proxy"]))
            print(line("same GET, direct to the guest", got["direct"]))
            print(line("GET /v1/vms/{id} (for scale)", got["api"]))
            ratio = statistics.median(got["proxy"]) / statistics.median(got["direct"])
            print(f"{'proxy / direct (p50)':<42} {ratio:7.1f} x")
            print(line("same GET, proxy origin (cookie)", measure_origin(c, vm_id, args.runs)))
            ssh = measure_ssh(c, vm_id, Path(tmp) / "known_hosts", max(20, args.runs // 10))
            print(line("SSH connect to first byte (OpenSSH)", ssh["first_byte"]))
            print(line("SSH `echo x`, start to exit", ssh["exit"]))
        finally:
            c.post(f"/v1/vms/{vm_id}/stop")
            c.delete(f"/v1/vms/{vm_id}")
            c.close()


if __name__ == "__main__":
    main()
