"""Egress proxy benchmark: what the sandbox network costs an HTTP(S) client, against the same client with a
veth straight to the same servers. Everything runs on this host in namespaces made here: a fake internet
(tests/fakenet.py), a namespace joined to it by one veth (the direct path), and a real `corral serve` whose
gateway's uplink is that fake internet, with one sandbox on it.

    sudo .venv/bin/python -m bench.egress [--new 300] [--keepalive 2000] [--conc 8] [--size 1024] [--rounds 3]

Paths, each measured by the same small client (this file, run as `python3 egress.py client ...`: standard
library only, Debian 12's python3 on both sides, the host's for the direct path, the image's in the sandbox):

- direct HTTPS / direct HTTP: the client in its own namespace, a veth into the fake internet, its CA given.
- sandbox HTTP through the proxy: http://allowed.test/ (an egress rule for it); the proxy reads each request.
- sandbox HTTPS passthrough: https://allowed.test/ with the fake CA; the proxy decides on the SNI and splices.
- sandbox HTTPS intercepted: https://api.secret.test/ with `Authorization: Bearer $BENCH_TOKEN`; a secret is
  scoped to the name, so the proxy terminates TLS (the sandbox trusts Corral's CA from its system store) and
  swaps the placeholder for the value.

For each: (a) a new connection per request (connect + handshake + GET + body, sequential), (b) one keep-alive
connection, sequential, (c) `--conc` keep-alive connections from as many threads; `--rounds` rounds over all
paths, each figure from the median round. The client resolves the name once (DNS is measured on its own: raw
UDP A queries, to the fake internet's DNS directly, to Corral's resolver from the sandbox). Beside the client's
numbers: the CPU time the proxy, the fake internet's server and each CPU of the machine spent while the client
measured (from /proc), which tells which process was the limit and whether something else ran meanwhile. By
default (2+ cores) the client and the fake internet's server are pinned to CPU 0 and the proxy to CPU 1, as in
the earlier probe of this design (docs/benchmarks.md). The fake internet's server is Python (asyncio, one
event logged per request): it, not the kernel, bounds the direct path.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import platform
import resource
import secrets
import socket
import ssl
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx
    from tests.support import Server

SCRIPT = Path(__file__).resolve()
IN_SANDBOX = "/root/egress-bench.py"
CA_IN_SANDBOX = "/root/fake-ca.pem"
DIRECT_NET = ("100.127.99.1", "100.127.99.2", 30)  # the fake internet's end, the client's end
SECRET_VALUE = "s3cr3t"  # noqa: S105 -- a made-up secret, only ever sent to the fake internet
TOKEN_ENV = "BENCH_TOKEN"  # noqa: S105 -- the name of the variable that holds its placeholder


# ==== the client (standard library only: it runs in the sandbox's python3) ====================================


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _HTTP(http.client.HTTPConnection):
    """HTTP to a fixed address; the Host header is the name."""

    def __init__(self, host: str, port: int, addr: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.addr = addr

    def connect(self) -> None:
        self.sock = socket.create_connection((self.addr, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HTTPS(http.client.HTTPSConnection):
    """HTTPS to a fixed address; SNI, certificate check and Host header are the name."""

    def __init__(self, host: str, port: int, addr: str, timeout: float, ctx: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=ctx)
        self.addr = addr
        self.ctx = ctx

    def connect(self) -> None:
        sock = socket.create_connection((self.addr, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self.ctx.wrap_socket(sock, server_hostname=self.host)


@dataclass
class ClientOpts:
    scheme: str
    host: str
    port: int
    addr: str
    path: str
    headers: dict[str, str]
    ctx: ssl.SSLContext | None
    timeout: float

    def connection(self) -> http.client.HTTPConnection:
        if self.ctx is None:
            return _HTTP(self.host, self.port, self.addr, self.timeout)
        return _HTTPS(self.host, self.port, self.addr, self.timeout, self.ctx)


def _get(conn: http.client.HTTPConnection, o: ClientOpts, path: str | None = None) -> bytes:
    conn.request("GET", path or o.path, headers=o.headers)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
    return body


@dataclass
class Tally:
    lat_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {exc}"


def _new_conn(o: ClientOpts, n: int, tally: Tally) -> None:
    for _ in range(n):
        t = time.perf_counter()
        conn = o.connection()
        try:
            _get(conn, o)
            tally.lat_ms.append((time.perf_counter() - t) * 1000)
        except (OSError, http.client.HTTPException, RuntimeError) as exc:
            tally.error(exc)
        finally:
            conn.close()


def _keepalive(o: ClientOpts, n: int, tally: Tally) -> None:
    conn = o.connection()
    try:
        for _ in range(n):
            t = time.perf_counter()
            try:
                _get(conn, o)
                tally.lat_ms.append((time.perf_counter() - t) * 1000)
            except (OSError, http.client.HTTPException, RuntimeError) as exc:
                tally.error(exc)
                conn.close()
                conn = o.connection()
    finally:
        conn.close()


def _dns_query(server: str, name: str, timeout: float) -> None:
    ident = secrets.randbits(16)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    packet = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (server, 53))
        while True:
            data = s.recv(2048)
            if len(data) >= 12 and struct.unpack("!H", data[:2])[0] == ident:
                break
    rcode, answers = data[3] & 0x0F, struct.unpack("!H", data[6:8])[0]
    if rcode != 0 or answers == 0:
        raise RuntimeError(f"DNS {name}: rcode {rcode}, {answers} answers")


def _resolv_conf_server() -> str:
    for line in Path("/etc/resolv.conf").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            return parts[1]
    raise RuntimeError("no nameserver in /etc/resolv.conf")


def client_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="egress.py client")
    p.add_argument("phase", choices=("probe", "new", "keepalive", "conc", "dns"))
    p.add_argument("--url", required=True, help="scheme://host[:port]")
    p.add_argument("--addr", help="connect here instead of resolving the name (once) with getaddrinfo")
    p.add_argument("--cafile", help="trust only this CA (default: the system store)")
    p.add_argument("--bearer-env", help="send Authorization: Bearer $THIS_VAR")
    p.add_argument("--path", default="/bytes/1024")
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--dns-server", help="default: the first nameserver of /etc/resolv.conf")
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args(argv)
    scheme, _, rest = a.url.partition("://")
    host, _, port_s = rest.partition(":")
    port = int(port_s) if port_s else (443 if scheme == "https" else 80)
    out: dict[str, Any] = {
        "phase": a.phase,
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
    }

    if a.phase == "dns":
        server = a.dns_server or _resolv_conf_server()
        tally = Tally()
        for i in range(a.warmup + a.n):
            t = time.perf_counter()
            try:
                _dns_query(server, host, a.timeout)
                if i >= a.warmup:
                    tally.lat_ms.append((time.perf_counter() - t) * 1000)
            except (OSError, RuntimeError) as exc:
                tally.error(exc)
        out.update(_summary(tally, 0.0, 0.0), server=server)
        print(json.dumps(out))
        return

    t = time.perf_counter()
    addr = a.addr or str(socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    out["resolve_ms"] = (time.perf_counter() - t) * 1000
    ctx = None
    if scheme == "https":
        ctx = ssl.create_default_context(cafile=a.cafile) if a.cafile else ssl.create_default_context()
    headers = {"Authorization": f"Bearer {os.environ[a.bearer_env]}"} if a.bearer_env else {}
    o = ClientOpts(scheme, host, port, addr, a.path, headers, ctx, a.timeout)

    if a.phase == "probe":
        conn = o.connection()
        try:
            seen = json.loads(_get(conn, o, "/probe"))
            if isinstance(conn, _HTTPS) and isinstance(conn.sock, ssl.SSLSocket):
                cert = conn.sock.getpeercert() or {}
                rdns: Any = cert.get("issuer", ())  # ((("commonName", "..."),), ...)
                issuer = {k: v for rdn in rdns for k, v in rdn}
                out["issuer"] = issuer.get("commonName") or issuer.get("organizationName")
                out["tls_version"] = conn.sock.version()
        finally:
            conn.close()
        out["server_saw"] = {
            "peer": seen["peer"],
            "sni": seen["sni"],
            "authorization": [v for k, v in seen["headers"] if k.lower() == "authorization"],
        }
        print(json.dumps(out))
        return

    warm = Tally()
    _keepalive(o, a.warmup, warm)
    _new_conn(o, max(1, a.warmup // 4), warm)
    tally = Tally()
    cpu0, t0, mono0 = _cpu_s(), time.perf_counter(), time.monotonic()
    if a.phase == "new":
        _new_conn(o, a.n, tally)
    elif a.phase == "keepalive":
        _keepalive(o, a.n, tally)
    else:
        per = [a.n // a.threads + (1 if i < a.n % a.threads else 0) for i in range(a.threads)]
        tallies = [Tally() for _ in per]
        workers = [
            threading.Thread(target=_keepalive, args=(o, k, tl)) for k, tl in zip(per, tallies, strict=True)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        for tl in tallies:
            tally.lat_ms += tl.lat_ms
            tally.errors += tl.errors
            tally.first_error = tally.first_error or tl.first_error
    out.update(_summary(tally, time.perf_counter() - t0, _cpu_s() - cpu0), warmup_errors=warm.errors)
    out["window"] = [mono0, time.monotonic()]  # CLOCK_MONOTONIC: the host's too (no time namespace)
    print(json.dumps(out))


def _summary(tally: Tally, elapsed: float, cpu: float) -> dict[str, Any]:
    lat = tally.lat_ms or [float("nan")]
    return {
        "n": len(tally.lat_ms),
        "errors": tally.errors,
        "first_error": tally.first_error,
        "elapsed_s": elapsed,
        "rps": len(tally.lat_ms) / elapsed if elapsed else None,
        "p50_ms": statistics.median(lat),
        "p95_ms": pct(lat, 0.95),
        "p99_ms": pct(lat, 0.99),
        "client_cpu": cpu / elapsed if elapsed else None,
    }


# ==== the bench (the host side) =================================================================================


def _run(argv: list[str], *, input: str | None = None, timeout: float = 30.0) -> str:
    import subprocess

    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


def _stat_fields(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the command name: fields[0] is the state (field 3 of proc(5))."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def egress_pid(server_pid: int) -> int:
    """The egress process among the node server's descendants (`ip netns exec` execs into it)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(entry.name)[1]), []).append(int(entry.name))
            except OSError:
                continue
    todo = [server_pid]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"corral" in argv and b"egress" in argv:
                return pid
    raise RuntimeError("no egress process under the node server")


@dataclass
class PathSpec:
    label: str
    where: str  # direct | sandbox
    url: str
    options: list[str]  # the client's: --addr, --cafile, --bearer-env
    base: str  # the direct row it is compared with


def path_specs(ca_pem: Path, addr: str) -> list[PathSpec]:
    direct, ca = ["--addr", addr], ["--cafile", str(ca_pem)]
    return [
        PathSpec("direct HTTPS", "direct", "https://allowed.test", [*direct, *ca], "direct HTTPS"),
        PathSpec("direct HTTP", "direct", "http://allowed.test", direct, "direct HTTP"),
        PathSpec(
            "proxy HTTPS passthrough",
            "sandbox",
            "https://allowed.test",
            ["--cafile", CA_IN_SANDBOX],
            "direct HTTPS",
        ),
        PathSpec(
            "proxy HTTPS intercepted",
            "sandbox",
            "https://api.secret.test",
            ["--bearer-env", TOKEN_ENV],
            "direct HTTPS",
        ),
        PathSpec("proxy HTTP", "sandbox", "http://allowed.test", [], "direct HTTP"),
    ]


@dataclass
class Runner:
    """Runs the client on either side and adds the CPU the proxy and the fake internet's server spent."""

    size: int
    python: str  # the direct side's interpreter
    direct_ns: str
    server_pid: int
    pin: list[str]  # a taskset prefix for the client, or nothing
    api: httpx.Client | None = None
    vm_id: str = ""
    proxy_pid: int | None = None

    def run(self, spec: PathSpec, phase: str, *extra: str) -> dict[str, Any]:
        argv = [phase, "--url", spec.url, "--path", f"/bytes/{self.size}", *spec.options, *extra]
        with Sampler(self.server_pid, self.proxy_pid) as sampler:
            if spec.where == "direct":
                ns = ["ip", "netns", "exec", self.direct_ns]
                out = _run([*ns, *self.pin, self.python, str(SCRIPT), "client", *argv], timeout=900)
            else:
                assert self.api is not None
                command = [*self.pin, "python3", IN_SANDBOX, "client", *argv]
                resp = self.api.post(
                    f"/v1/vms/{self.vm_id}/exec", json={"command": command, "timeout": 900}, timeout=960
                )
                resp.raise_for_status()
                body = resp.json()
                if body["exit_code"] != 0:
                    raise RuntimeError(
                        f"the client in the sandbox failed ({body['exit_code']}): {body['stderr']}"
                    )
                out = body["stdout"]
        result: dict[str, Any] = json.loads(out)
        if "window" in result:
            result.update(sampler.used(*result["window"]))
        return result


class Sampler:
    """CPU seconds of the fake internet's server, of the proxy and of each CPU of the machine (busy time),
    sampled every 20 ms while a client runs; ``used(t0, t1)`` interpolates what each spent between two
    CLOCK_MONOTONIC times the client reported (its measurement alone: no interpreter start, no warm-up)."""

    INTERVAL = 0.02

    def __init__(self, server_pid: int, proxy_pid: int | None) -> None:
        self.pids = {"server": server_pid, "proxy": proxy_pid}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self._sample()

    def _sample(self) -> None:
        values = {k: cpu_seconds(p) for k, p in self.pids.items() if p is not None}
        values.update(cpus_busy_seconds())
        self.samples.append((time.monotonic(), values))

    def _at(self, t: float, key: str) -> float:
        for (ta, a), (tb, b) in itertools.pairwise(self.samples):
            if ta <= t <= tb:
                return a[key] + (b[key] - a[key]) * ((t - ta) / (tb - ta) if tb > ta else 0.0)
        raise ValueError(t)

    def used(self, t0: float, t1: float) -> dict[str, float]:
        if not self.samples[0][0] <= t0 < t1 <= self.samples[-1][0]:
            raise RuntimeError(
                f"the client's window {t0}..{t1} is not within the sampled one (a time namespace?)"
            )
        return {f"{k}_cpu_s": self._at(t1, k) - self._at(t0, k) for k in self.samples[0][1]}


def cpus_busy_seconds() -> dict[str, float]:
    """Each CPU's busy time (its line of /proc/stat but idle and iowait): {"cpu0": ..., "cpu1": ...}."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in values[:8])
            busy[name] = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        elif busy:
            break
    return busy


def join_direct(ns: str, internet_ns: str) -> None:
    """A veth from ``ns`` (eth0) into the fake internet, and a route to its hosts."""
    outside, inside, prefix = DIRECT_NET
    peer = f"cbd-{ns[-6:]}"
    _run(
        ["ip", "-n", ns, "-batch", "-"],
        input="\n".join(
            [
                f"link add eth0 type veth peer name {peer} netns {internet_ns}",
                f"addr add {inside}/{prefix} dev eth0",
                "link set lo up",
                "link set eth0 up",
            ]
        )
        + "\n",
    )
    _run(["ip", "-n", internet_ns, "addr", "add", f"{outside}/{prefix}", "dev", peer])
    _run(["ip", "-n", internet_ns, "link", "set", peer, "up"])
    _run(["ip", "-n", ns, "route", "add", "198.18.0.0/15", "via", outside])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new", type=int, default=300, help="requests, a new connection each (300)")
    parser.add_argument("--keepalive", type=int, default=2000, help="requests on one connection (2000)")
    parser.add_argument("--conc", type=int, default=8, help="keep-alive connections at once (8; 0: skip)")
    parser.add_argument("--conc-requests", type=int, default=2000, help="requests over all of them (2000)")
    parser.add_argument("--dns", type=int, default=200, help="DNS queries per side (200; 0: skip)")
    parser.add_argument("--size", type=int, default=1024, help="response body in bytes (1024)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds over all paths; each figure is the median round's (3)"
    )
    parser.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    parser.add_argument(
        "--direct-python",
        default="/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable,
        help="the direct client's interpreter (default /usr/bin/python3: Debian 12's, as in the image)",
    )
    return parser.parse_args()


def bench_main() -> None:
    import contextlib
    import signal
    import tempfile

    import httpx

    sys.path.insert(0, str(SCRIPT.parent.parent))
    from tests.fakenet import DNS_ADDR, HOSTS, FakeInternet, add_netns, del_netns
    from tests.support import node_server, signup
    from tests.vmtools import create_ready, destroy

    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so that every cleanup below runs
    started = time.monotonic()
    cores = os.cpu_count() or 1
    pin = not args.no_pin and cores >= 2
    load = os.getloadavg()
    print(f"# Corral egress proxy benchmark, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")
    print(
        f"# host: {platform.node()}, {cores} cores, kernel {platform.release()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start"
    )
    print(
        f"# GET /bytes/{args.size}; new-conn n={args.new}, keep-alive n={args.keepalive}, "
        f"c{args.conc} n={args.conc_requests}; "
        + ("client and fake internet server on CPU 0, proxy on CPU 1" if pin else "no CPU pinning"),
        flush=True,
    )

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="corral-bench-egress-")))
        net = stack.enter_context(FakeInternet.start(tmp / "internet"))
        assert net.pid is not None
        direct_ns = add_netns("cbd-")
        stack.callback(del_netns, direct_ns)
        join_direct(direct_ns, net.name)
        if pin:
            _run(["taskset", "-a", "-p", "-c", "0", str(net.pid)])
        runner = Runner(
            args.size, args.direct_python, direct_ns, net.pid, ["taskset", "-c", "0"] if pin else []
        )

        srv: Server = stack.enter_context(
            node_server(
                tmp,
                CORRAL_WARM_POOL_SIZE="0",
                CORRAL_UPLINK=f"netns:{net.name}",
                CORRAL_UPSTREAM_DNS=DNS_ADDR,
                CORRAL_UPSTREAM_CA=str(net.ca_pem),
            )
        )
        runner.proxy_pid = egress_pid(srv.proc.pid)
        if pin:
            _run(["taskset", "-a", "-p", "-c", "1", str(runner.proxy_pid)])
        api = stack.enter_context(signup(srv).client)
        api.timeout = httpx.Timeout(120.0)
        for host in ("allowed.test", "api.secret.test"):
            api.post("/v1/egress/rules", json={"host": host}).raise_for_status()
        secret = {"name": "bench", "secret": SECRET_VALUE, "env_var": TOKEN_ENV, "hosts": ["api.secret.test"]}
        api.post("/v1/secrets", json=secret).raise_for_status()
        vm_id = create_ready(api, vcpus=min(2, cores))["id"]
        stack.callback(destroy, api, vm_id)
        for path, content in ((IN_SANDBOX, SCRIPT.read_bytes()), (CA_IN_SANDBOX, net.ca_pem.read_bytes())):
            api.post(
                f"/v1/vms/{vm_id}/files/upload", params={"path": path}, content=content
            ).raise_for_status()
        runner.api, runner.vm_id = api, vm_id
        setup_s = time.monotonic() - started

        specs = path_specs(net.ca_pem, HOSTS["allowed.test"])
        for spec in specs:
            probe = runner.run(spec, "probe")
            print(f"## {spec.label}: {probe_line(probe)}", flush=True)
            if spec.label == "proxy HTTPS intercepted":
                got = probe["server_saw"]["authorization"]
                if got != [f"Bearer {SECRET_VALUE}"]:
                    raise RuntimeError(f"the proxy did not inject the secret: the server saw {got}")
        phases = [("new", args.new), ("keepalive", args.keepalive)]
        phases += [("conc", args.conc_requests)] if args.conc > 0 else []
        # rounds over every path in turn, so that a change in the machine's other load hits all paths alike
        rounds: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for i in range(args.rounds):
            for spec in specs:
                for phase, n in phases:
                    r = runner.run(spec, phase, "-n", str(n), "--threads", str(max(1, args.conc)))
                    rounds.setdefault((spec.label, phase), []).append(r)
                    if r["errors"] or r["warmup_errors"]:
                        print(
                            f"   round {i + 1}, {spec.label}, {phase}: {r['errors']} errors "
                            f"(+{r['warmup_errors']} in warm-up), first: {r['first_error']}"
                        )
            print(f"# round {i + 1} done, {time.monotonic() - started:.0f} s", flush=True)
        results: dict[str, dict[str, dict[str, Any]]] = {}
        for (label, phase), runs in rounds.items():
            ordered = sorted(runs, key=lambda r: float(r["rps"] or 0.0))
            results.setdefault(label, {})[phase] = {
                **ordered[len(ordered) // 2],
                "rps_range": (ordered[0]["rps"], ordered[-1]["rps"]),
                "errors": sum(r["errors"] for r in runs),
            }
        dns: dict[str, dict[str, Any]] = {}
        if args.dns > 0:
            n = str(args.dns)
            dns["direct, the fake internet's DNS"] = runner.run(
                specs[0], "dns", "-n", n, "--dns-server", DNS_ADDR
            )
            dns["sandbox, Corral's resolver"] = runner.run(specs[2], "dns", "-n", n)

        print_tables(results, specs, dns, args.conc, args.rounds)
        log = srv.data_dir / "egress" / "egress.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        problems = [x for x in lines if any(w in x for w in ("ERROR", "WARNING", "Traceback", "rror"))]
        print(f"\n# egress log: {len(lines)} lines, {len(problems)} with a warning or an error")
        for x in problems[:10]:
            print(f"#   {x[:200]}")
        print(f"# setup {setup_s:.1f} s, total {time.monotonic() - started:.1f} s before cleanup", flush=True)
    load = os.getloadavg()
    print(
        f"# done in {time.monotonic() - started:.1f} s with cleanup; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def probe_line(p: dict[str, Any]) -> str:
    seen = p["server_saw"]
    parts = [f"the server saw peer {seen['peer']}, SNI {seen['sni']}"]
    if "issuer" in p:
        parts.append(f"the client saw a certificate from {p['issuer']!r} ({p['tls_version']})")
    if seen["authorization"]:
        parts.append(f"Authorization {seen['authorization']}")
    parts.append(f"python {p['python']}, {p['openssl']}")
    return "; ".join(parts)


def cpus(r: dict[str, Any], elapsed: float) -> str:
    found = sorted((k for k in r if k.startswith("cpu") and k.endswith("_cpu_s")), key=lambda k: int(k[3:-6]))
    return " / ".join(f"{r[k] / elapsed * 100:.0f}" for k in found)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def print_tables(
    results: dict[str, dict[str, dict[str, Any]]],
    specs: list[PathSpec],
    dns: dict[str, dict[str, Any]],
    conc: int,
    rounds: int,
) -> None:
    print()
    print(
        "| path | new-conn p50 ms | new-conn p95 ms | new-conn rps | keep-alive rps | keep-alive p50 ms "
        f"| keep-alive p95 ms | c{conc} rps | ratio to direct (keep-alive rps) | ratio to direct (new-conn rps) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in specs:
        got, base = results[spec.label], results[spec.base]
        new, ka, many = got["new"], got["keepalive"], got.get("conc")
        print(
            f"| {spec.label} | {fmt(new['p50_ms'])} | {fmt(new['p95_ms'])} | {fmt(new['rps'], '.0f')} "
            f"| {fmt(ka['rps'], '.0f')} | {fmt(ka['p50_ms'], '.3f')} | {fmt(ka['p95_ms'], '.3f')} "
            f"| {fmt(many['rps'], '.0f') if many else '-'} | {ka['rps'] / base['keepalive']['rps']:.2f} "
            f"| {new['rps'] / base['new']['rps']:.2f} |"
        )
    print()
    print(
        f"Each figure is from the median round (by rps) of {rounds}; rps from the slowest to the fastest round:"
    )
    print()
    print(f"| path | new-conn rps | keep-alive rps | c{conc} rps |")
    print("|---|---|---|---|")
    for spec in specs:
        spread = [results[spec.label].get(phase) for phase in ("new", "keepalive", "conc")]
        cells = [f"{r['rps_range'][0]:.0f}-{r['rps_range'][1]:.0f}" if r else "-" for r in spread]
        print(f"| {spec.label} | {' | '.join(cells)} |")
    print()
    print(
        "CPU while the client measured (median round; from /proc, sampled every 20 ms): per request in us, of"
    )
    print(
        "the proxy process and of the fake internet's server; in % of one core, of those, of the client and of"
    )
    print("each CPU (busy time from /proc/stat: all processes, the kernel's network work included)")
    print()
    print(
        "| path | phase | proxy us/req | proxy % | server us/req | server % | client % | busy % per CPU (0 / 1 / ...) "
        "| errors, all rounds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in specs:
        for phase in ("new", "keepalive", "conc"):
            r = results[spec.label].get(phase)
            if r is None or not r["n"]:
                continue
            n, el = r["n"], r["elapsed_s"]
            proxy: float | None = r.get("proxy_cpu_s") if spec.where == "sandbox" else None
            server: float = r["server_cpu_s"]
            print(
                f"| {spec.label} | {phase} | {fmt(None if proxy is None else proxy / n * 1e6, '.0f')} "
                f"| {fmt(None if proxy is None else proxy / el * 100, '.0f')} | {server / n * 1e6:.0f} "
                f"| {server / el * 100:.0f} | {r['client_cpu'] * 100:.0f} | {cpus(r, el)} "
                f"| {r['errors']} |"
            )
    print()
    for label, r in dns.items():
        print(
            f"DNS A query for allowed.test, {label}: p50 {fmt(r['p50_ms'], '.3f')} ms, "
            f"p95 {fmt(r['p95_ms'], '.3f')} ms (n={r['n']}, errors {r['errors']})"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client_main(sys.argv[2:])
    else:
        bench_main()
