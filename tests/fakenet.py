"""A fake internet in a network namespace, for tests of the egress gateway (its uplink goes into it).

``FakeInternet.start(workdir)`` makes a namespace ``cfi-<6 hex>`` whose interface ``fihosts`` carries the
addresses of a few made-up hosts (``HOSTS``, in 198.18.0.0/15) and of a DNS server (``DNS_ADDR``), runs one
server process there (``tests/fakenet_servers.py``: HTTP, HTTPS with certificates from a fresh CA, DNS, a TCP
echo, UDP listeners; every event one JSON line in ``log_path``) and counts, with nftables, every packet that
arrives from outside the namespace (``counters()``). Nothing in the namespace routes anywhere: a packet that
arrives there is answered or dropped, never forwarded.

The uplink is not made here: whoever joins the namespace (Corral, or a test) adds a veth whose end lives in
it, with an address of its own. Use::

    with FakeInternet.start(tmp_path) as net:
        ...  # join a veth into net.name, send traffic, then look at net.events() and net.counters()
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOSTS: dict[str, str] = {
    "allowed.test": "198.18.1.1",
    "other.test": "198.18.1.2",
    "api.secret.test": "198.18.1.3",
    "evil.test": "198.18.1.4",
    "a.wild.test": "198.18.1.5",
    "b.wild.test": "198.18.1.6",
    "deep.a.wild.test": "198.18.1.7",
    "tcp.test": "198.18.2.1",
}
DNS_ADDR = "198.18.0.53"
DNS_PORT = 53
HTTP_PORT = 80
HTTPS_PORT = 443
ECHO_HOST = "tcp.test"
ECHO_PORT = 7000
UDP_PORT = 9999
HOSTS_IF = "fihosts"
NS_PREFIX = "cfi-"
TABLE = "fakenet"
COUNTERS = ("ip6", "icmp", "udp_dns", "udp_other", "tcp", "other")
SERVERS_SCRIPT = Path(__file__).resolve().with_name("fakenet_servers.py")

_NETNS_DIR = Path("/run/netns")
# Whether /run/netns was a mount point before this module first made a namespace: `ip netns add` mounts it
# (once, for good); if this module caused that, it unmounts it again when its last namespace is gone.
_netns_dir_was_mounted: bool | None = None
_netns_dir_existed = True
_netns_lock = threading.Lock()


# --- namespaces ---


def _run(argv: Sequence[str], *, input: str | None = None, timeout: float = 30.0) -> str:
    """Runs a command; raises RuntimeError with its stderr when it fails."""
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def run_in(
    ns: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Runs ``argv`` inside network namespace ``ns`` (``ip netns exec``), capturing text output."""
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], input=input, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"in {ns}: {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}".strip()
        )
    return proc


def _is_mount_point(path: Path) -> bool:
    """From /proc/self/mountinfo: os.path.ismount misses a directory bind-mounted onto itself, which is
    how `ip netns add` mounts /run/netns."""
    target = str(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].encode().decode("unicode_escape")  # octal escapes: \040 for a space
        if mount_point == target:
            return True
    return False


def netns_names() -> set[str]:
    out = _run(["ip", "netns", "list"])
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def add_netns(prefix: str) -> str:
    """Makes a named network namespace ``<prefix><6 hex>`` (unique) and returns its name."""
    global _netns_dir_was_mounted, _netns_dir_existed
    with _netns_lock:
        if _netns_dir_was_mounted is None:
            _netns_dir_existed = _NETNS_DIR.is_dir()
            _netns_dir_was_mounted = _is_mount_point(_NETNS_DIR)
    for _ in range(8):
        name = f"{prefix}{secrets.token_hex(3)}"
        if (_NETNS_DIR / name).exists():
            continue
        _run(["ip", "netns", "add", name])
        return name
    raise RuntimeError(f"no free namespace name with prefix {prefix!r}")


def del_netns(name: str) -> None:
    """Deletes a named network namespace if it exists (and /run/netns's mount if this module made it and
    no namespace is left in it)."""
    if (_NETNS_DIR / name).exists():
        proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
        if proc.returncode != 0 and (_NETNS_DIR / name).exists():
            raise RuntimeError(f"ip netns del {name} failed: {proc.stderr.strip()}")
    with _netns_lock:
        if (
            _netns_dir_was_mounted is False
            and _NETNS_DIR.is_dir()
            and not any(_NETNS_DIR.iterdir())
            and _is_mount_point(_NETNS_DIR)
        ):
            unmounted = subprocess.run(["umount", str(_NETNS_DIR)], capture_output=True).returncode == 0
            if unmounted and not _netns_dir_existed:
                with contextlib.suppress(OSError):
                    _NETNS_DIR.rmdir()


def call_in_netns[T](ns: str, fn: Callable[[], T]) -> T:
    """Calls ``fn`` in a fresh thread that has joined namespace ``ns`` (network only: files, mounts and
    everything else stay the caller's); sockets it makes live in ``ns``. Returns its result or raises its
    exception."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(_NETNS_DIR / ns, os.O_RDONLY)
            try:
                os.setns(fd, os.CLONE_NEWNET)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name=f"in-{ns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


# --- certificates ---


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def make_certificates(directory: Path, names: Sequence[str]) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """A fresh CA (``ca.pem``) and, for each name, a server certificate for it signed by the CA. Returns the
    CA's path and ``{name: (cert path, key path)}``."""
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"Corral fake internet CA {secrets.token_hex(4)}")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    certs: dict[str, tuple[Path, Path]] = {}
    for host in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(host))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{host}.pem", directory / f"{host}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca_path.read_bytes())
        _write_key(key_path, key)
        certs[host] = (cert_path, key_path)
    return ca_path, certs


# --- the fake internet ---


def _counter_declarations() -> str:
    """The table and its named counters, as nft JSON: nft 1.0's text syntax takes no counter named like a
    keyword (ip6, icmp, tcp) in a declaration, though it does in a rule (quoted)."""
    table = {"family": "inet", "name": TABLE}
    objects: list[dict[str, Any]] = [{"add": {"table": table}}]
    objects += [{"add": {"counter": {"family": "inet", "table": TABLE, "name": n}}} for n in COUNTERS]
    return json.dumps({"nftables": objects})


def _rules() -> str:
    """Counts each packet that arrives from outside (any interface but lo and fihosts) once, by kind; drops
    nothing."""
    return f"""table inet {TABLE} {{
  chain arrivals {{
    type filter hook prerouting priority raw; policy accept;
    iifname {{ "lo", "{HOSTS_IF}" }} return
    meta nfproto ipv6 counter name "ip6" return
    meta l4proto icmp counter name "icmp" return
    udp dport {DNS_PORT} counter name "udp_dns" return
    meta l4proto udp counter name "udp_other" return
    meta l4proto tcp counter name "tcp" return
    counter name "other"
  }}
}}
"""


def _add_hosts_link(ns: str) -> str:
    """Adds the link that carries the hosts' addresses: a dummy, or an ifb (as inert) on a kernel built
    without dummy links. Returns the kind used."""
    errors = []
    for kind in ("dummy", "ifb"):
        proc = subprocess.run(
            ["ip", "-n", ns, "link", "add", HOSTS_IF, "type", kind], capture_output=True, text=True
        )
        if proc.returncode == 0:
            return kind
        errors.append(f"{kind}: {proc.stderr.strip()}")
    raise RuntimeError(f"cannot make {HOSTS_IF}: " + "; ".join(errors))


Event = dict[str, Any]


class FakeInternet:
    """The fake internet; see the module's docstring. ``FakeInternet.start(workdir)`` returns a running one
    (a context manager that closes it); ``FakeInternet(workdir)`` then ``open()`` is the same in two steps.
    ``close()`` is idempotent and leaves nothing behind, also after a failed ``open()``."""

    def __init__(
        self,
        workdir: Path,
        *,
        servers_script: Path = SERVERS_SCRIPT,
        ready_timeout: float = 10.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.servers_script = servers_script
        self.ready_timeout = ready_timeout
        self.name = ""  # the namespace, once made
        self.pid: int | None = None  # the server process
        self.hosts_link_kind = ""  # "dummy", or "ifb" on a kernel without dummy interfaces
        self.dir = Path()
        self.ca_pem = Path()
        self.certs: dict[str, tuple[Path, Path]] = {}
        self.log_path = Path()
        self.stderr_path = Path()
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(
        cls, workdir: Path, *, servers_script: Path = SERVERS_SCRIPT, ready_timeout: float = 10.0
    ) -> Self:
        net = cls(workdir, servers_script=servers_script, ready_timeout=ready_timeout)
        net.open()
        return net

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- lifecycle ---

    def open(self) -> None:
        if self.name:
            raise RuntimeError("this FakeInternet was opened already")
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="fakenet-", dir=self.workdir))
        self.ca_pem, self.certs = make_certificates(self.dir, list(HOSTS))
        self.log_path = self.dir / "events.jsonl"
        self.log_path.touch()
        self.stderr_path = self.dir / "servers.stderr"

        self.name = add_netns(NS_PREFIX)
        self.hosts_link_kind = _add_hosts_link(self.name)
        addrs = [DNS_ADDR, *sorted(set(HOSTS.values()))]
        batch = [
            "link set lo up",
            *(f"addr add {a}/32 dev {HOSTS_IF}" for a in addrs),
            f"link set {HOSTS_IF} up",
        ]
        _run(["ip", "-n", self.name, "-batch", "-"], input="\n".join(batch) + "\n")
        run_in(self.name, ["nft", "-j", "-f", "-"], input=_counter_declarations())
        run_in(self.name, ["nft", "-f", "-"], input=_rules())

        config = {
            "hosts": HOSTS,
            "dns_addr": DNS_ADDR,
            "http_port": HTTP_PORT,
            "https_port": HTTPS_PORT,
            "echo_addr": HOSTS[ECHO_HOST],
            "echo_port": ECHO_PORT,
            "udp_port": UDP_PORT,
            "log_path": str(self.log_path),
            "certs": {host: [str(cert), str(key)] for host, (cert, key) in self.certs.items()},
        }
        config_path = self.dir / "servers.json"
        config_path.write_text(json.dumps(config, indent=1))
        with self.stderr_path.open("wb") as stderr:
            self._proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.name,
                    sys.executable,
                    str(self.servers_script),
                    str(config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        self.pid = self._proc.pid  # `ip netns exec` execs the program: this is the server's own pid
        self._wait_ready(self._proc)

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        deadline = time.monotonic() + self.ready_timeout
        got = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in got:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        f"the fake internet's servers were not ready in {self.ready_timeout} s:\n"
                        + self._stderr()
                    )
                if sel.select(left):
                    data = os.read(proc.stdout.fileno(), 4096)
                    if not data:
                        proc.wait(timeout=5)
                        raise RuntimeError(
                            f"the fake internet's servers exited ({proc.returncode}) before they were ready:\n"
                            + self._stderr()
                        )
                    got += data
        proc.stdout.close()  # the servers print nothing after "ready"
        if got.strip() != b"ready":
            raise RuntimeError(
                f"unexpected output from the fake internet's servers: {got!r}\n{self._stderr()}"
            )

    def _stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self.name:
            del_netns(self.name)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- what arrived ---

    def _counters(self) -> dict[str, dict[str, int]]:
        out = run_in(self.name, ["nft", "-j", "list", "counters", "table", "inet", TABLE]).stdout
        found: dict[str, dict[str, int]] = {}
        for item in json.loads(out)["nftables"]:
            counter = item.get("counter")
            if counter is not None:
                found[counter["name"]] = {"packets": counter["packets"], "bytes": counter["bytes"]}
        return found

    def counters(self) -> dict[str, int]:
        """Packets that arrived from outside, by kind: ``ip6`` (any IPv6), ``icmp``, ``udp_dns`` (UDP to port
        53), ``udp_other``, ``tcp`` (any port, DNS over TCP too), ``other``. ARP is not counted."""
        return {name: c["packets"] for name, c in self._counters().items()}

    def counter_bytes(self) -> dict[str, int]:
        return {name: c["bytes"] for name, c in self._counters().items()}

    def mark(self) -> int:
        """A position in the event log: ``events_since(mark)`` gives what was logged after it."""
        data = self.log_path.read_bytes()
        return data.rfind(b"\n") + 1

    def events_since(self, mark: int, kind: str | None = None) -> list[Event]:
        with self.log_path.open("rb") as f:
            f.seek(mark)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]  # a line still being written is left for later
        events = [json.loads(line) for line in data.splitlines() if line.strip()]
        return [e for e in events if kind is None or e["kind"] == kind]

    def events(self, kind: str | None = None) -> list[Event]:
        """Every event logged so far (of one kind: http, https, tls_error, dns, tcp, udp)."""
        return self.events_since(0, kind)

    def wait_for(
        self,
        kind: str,
        match: Callable[[Event], bool] | Mapping[str, Any] | None = None,
        *,
        since: int = 0,
        timeout: float = 5.0,
    ) -> Event:
        """The first event of ``kind`` after ``since`` that ``match`` accepts (a predicate, or fields that
        must be equal), waiting up to ``timeout`` seconds for it."""
        if match is None:
            pred: Callable[[Event], bool] = lambda e: True  # noqa: E731
        elif isinstance(match, Mapping):
            fields = dict(match)
            pred = lambda e: all(e.get(k) == v for k, v in fields.items())  # noqa: E731
        else:
            pred = match
        deadline = time.monotonic() + timeout
        while True:
            events = self.events_since(since, kind)
            for event in events:
                if pred(event):
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching {kind} event in {timeout} s; got: {events}")
            time.sleep(0.01)
