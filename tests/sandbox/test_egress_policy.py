"""The egress policy seen from inside real sandboxes: what an allowlist lets through (HTTP, HTTPS passed
through by SNI, raw TCP by CIDR or by a name the sandbox resolved, single-level wildcards), what enforce mode
stops before a packet reaches the (fake) internet, what warn mode lets through and records, the audit trail
and its filters, per-VM overrides, changes applied to new connections within a second, and Host/SNI checks
on keep-alive connections and spoofed names.

Every sandbox talks only to the session's fake internet (``tests/fakenet.py``), whose log shows what arrived
where. Denied DNS lookups may appear in the audit log with protocol ``dns``: they are accepted wherever they
show up, never required."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shlex
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests import vmtools
from tests.fakenet import DNS_ADDR, ECHO_PORT, HOSTS, Event, FakeInternet
from tests.support import Account

CA_PATH = "/tmp/fake-ca.pem"
BLOCKED = "Blocked by the Corral egress policy."
AUDIT_WAIT = 3.0  # the proxy writes audit events in batches
CHANGE_DEADLINE = 1.0  # a policy or rule change applies to new connections within this
ALLOWED, OTHER, EVIL = HOSTS["allowed.test"], HOSTS["other.test"], HOSTS["evil.test"]
WILD_A, WILD_B, WILD_DEEP = HOSTS["a.wild.test"], HOSTS["b.wild.test"], HOSTS["deep.a.wild.test"]
ECHO = HOSTS["tcp.test"]
EVENT_FIELDS = {"id", "timestamp", "vm_id", "host", "cidr", "protocol", "verdict", "allowed", "mode"}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")

# Run inside a sandbox: connect to argv[1]:argv[2], send a line, report whether it came back.
TCP_PROBE = r"""
import json, socket, sys
payload = b"corral-echo-probe\n"
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
except OSError as exc:
    print(json.dumps({"result": "connect-failed", "error": repr(exc)}))
    sys.exit()
got = b""
try:
    s.sendall(payload)
    while len(got) < len(payload):
        data = s.recv(4096)
        if not data:
            break
        got += data
except OSError as exc:
    print(json.dumps({"result": "error", "error": repr(exc), "got": got.decode(errors="replace")}))
    sys.exit()
print(json.dumps({"result": "echo" if got == payload else "closed", "got": got.decode(errors="replace")}))
"""

# Run inside a sandbox: two requests on ONE connection to allowed.test:80 (no silent reconnect: auto_open
# is off), the second with Host: other.test.
KEEPALIVE = r"""
import http.client, json
conn = http.client.HTTPConnection("allowed.test", 80, timeout=5)
conn.auto_open = 0
conn.connect()
sock = conn.sock
out = {"port": sock.getsockname()[1]}
conn.request("GET", "/keepalive-first")
r1 = conn.getresponse()
out["first"] = [r1.status, r1.read().decode(errors="replace")]
out["open_after_first"] = conn.sock is sock
try:
    conn.request("GET", "/keepalive-second", headers={"Host": "other.test"})
    out["same_socket"] = conn.sock is sock
    r2 = conn.getresponse()
    out["second"] = [r2.status, r2.read().decode(errors="replace")]
except Exception as exc:
    out["second"] = [0, repr(exc)]
print(json.dumps(out))
"""

# Run inside a sandbox: poll other.test until it is reachable (want "ok") or not (want "denied"), by name
# (DNS, then the proxy by Host) and by address with a Host header (the proxy alone), a new connection per
# try; prints every try as [start time, state by name, state by address].
POLL = r"""
import http.client, json, sys, time
want, deadline = sys.argv[1], time.time() + float(sys.argv[2])

def state(host, headers):
    conn = http.client.HTTPConnection(host, 80, timeout=2)
    try:
        conn.request("GET", "/live-poll", headers=headers)
        resp = conn.getresponse()
        resp.read()
        return "ok" if resp.status == 200 else "http-%d" % resp.status
    except Exception as exc:
        return type(exc).__name__
    finally:
        conn.close()

tries = []
while time.time() < deadline:
    start = time.time()
    by_name = state("other.test", {})
    by_addr = state("198.18.1.2", {"Host": "other.test"})
    tries.append([start, by_name, by_addr])
    ok = by_name == "ok" and by_addr == "ok"
    denied = by_name != "ok" and by_addr != "ok"
    if (want == "ok" and ok) or (want == "denied" and denied):
        break
    time.sleep(0.01)
print(json.dumps(tries))
"""


# ---- sandboxes -------------------------------------------------------------------------------------------


@dataclass
class Curl:
    rc: int  # curl's exit code
    code: int  # HTTP status, 0 if there was no response
    body: str
    stderr: str

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Box:
    """One running sandbox of a test, driven through exec."""

    client: httpx.Client
    vm: dict[str, Any]

    @property
    def id(self) -> str:
        vm_id: str = self.vm["id"]
        return vm_id

    def run(self, command: str | list[str]) -> dict[str, Any]:
        return vmtools.run(self.client, self.id, command, timeout=60)

    def upload_ca(self, internet: FakeInternet) -> None:
        resp = self.client.post(
            f"/v1/vms/{self.id}/files/upload", params={"path": CA_PATH}, content=internet.ca_pem.read_bytes()
        )
        assert resp.status_code in (200, 201, 204), resp.text

    def curl(self, *args: str) -> Curl:
        out = self.run(["sh", "-c", "curl -sS -m 5 -w '\\n%{http_code}' " + shlex.join(args)])
        body, _, code = out["stdout"].rpartition("\n")
        return Curl(out["exit_code"], int(code) if code.isdigit() else 0, body, out["stderr"])

    def tcp(self, host: str, port: int = ECHO_PORT) -> dict[str, Any]:
        out = self.run(["python3", "-c", TCP_PROBE, host, str(port)])
        assert out["exit_code"] == 0, out
        result: dict[str, Any] = json.loads(out["stdout"])
        return result

    def dns(
        self, name: str, server: str | None = None, *, qtype: str = "A", tcp: bool = False
    ) -> tuple[str, list[str]]:
        """(status, A answers) of a lookup from the sandbox (to ``server`` if given: it is redirected to
        Corral's resolver like every DNS packet a sandbox sends)."""
        argv = ["dig", "+time=2", "+tries=1", "+noall", "+comments", "+answer", name, qtype]
        if server:
            argv.append(f"@{server}")
        if tcp:
            argv.append("+tcp")
        out = self.run(argv)
        status = re.search(r"status: (\w+)", out["stdout"])
        assert status, out
        answers = [line.split()[-1] for line in out["stdout"].splitlines() if re.search(r"\sIN\s+A\s", line)]
        return status.group(1), answers

    def python(self, script: str, *args: str) -> Any:
        out = self.run(["python3", "-c", script, *args])
        assert out["exit_code"] == 0, out
        return json.loads(out["stdout"])


@contextlib.contextmanager
def sandboxes(
    account: Account, *egress: Mapping[str, Any] | None, internet: FakeInternet | None = None
) -> Iterator[list[Box]]:
    """One ready sandbox per ``egress`` (its per-VM overrides, or None), created together, with the fake
    internet's CA at CA_PATH if ``internet`` is given; all destroyed afterwards."""
    c = account.client
    ids: list[str] = []
    try:
        for override in egress:
            body: dict[str, Any] = {"name": vmtools.unique_name(), "public_key": vmtools.public_key()}
            if override is not None:
                body["egress"] = dict(override)
            resp = c.post("/v1/vms", json=body)
            assert resp.status_code == 201, resp.text
            ids.append(resp.json()["id"])
        boxes = []
        for vm_id in ids:
            vm = vmtools.wait_detail(c, vm_id)
            assert vm["status_detail"] == "ready", vm
            box = Box(c, vm)
            if internet is not None:
                box.upload_ca(internet)
            boxes.append(box)
        yield boxes
    finally:
        for vm_id in ids:
            vmtools.destroy(c, vm_id)


@contextlib.contextmanager
def sandbox(
    account: Account, egress: Mapping[str, Any] | None = None, internet: FakeInternet | None = None
) -> Iterator[Box]:
    with sandboxes(account, egress, internet=internet) as boxes:
        yield boxes[0]


def add_rule(account: Account, **rule: str) -> str:
    resp = account.client.post("/v1/egress/rules", json=rule)
    assert resp.status_code == 201, resp.text
    rule_id: str = resp.json()["id"]
    return rule_id


def set_mode(account: Account, mode: str) -> None:
    resp = account.client.put("/v1/egress/policy", json={"mode": mode})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"mode": mode}


# ---- the fake internet ---------------------------------------------------------------------------------


def arrived(internet: FakeInternet, mark: int, kind: str, timeout: float = 3.0, **fields: Any) -> Event:
    return internet.wait_for(kind, fields, since=mark, timeout=timeout)


def touching(events: list[Event], *, addrs: Collection[str] = (), names: Collection[str] = ()) -> list[Event]:
    """The events at one of ``addrs``, or naming one of ``names`` (DNS question, Host, SNI)."""
    hits = []
    for e in events:
        said = {str(e.get(k) or "").lower().split(":")[0] for k in ("qname", "host", "sni")}
        if e.get("addr") in addrs or said & set(names):
            hits.append(e)
    return hits


# ---- the audit log -------------------------------------------------------------------------------------


def audit_page(client: httpx.Client, **params: Any) -> dict[str, Any]:
    resp = client.get("/v1/audit/egress", params=params)
    assert resp.status_code == 200, resp.text
    page: dict[str, Any] = resp.json()
    for event in page["data"]:
        check_shape(event)
    return page


def audit_all(client: httpx.Client, **params: Any) -> list[Event]:
    """Every event the filter matches (all pages of 500)."""
    events: list[Event] = []
    cursor: str | None = None
    while True:
        page = audit_page(client, **params, limit=500, **({"cursor": cursor} if cursor else {}))
        events += page["data"]
        if not page["has_more"]:
            return events
        cursor = page["cursor"]


def check_shape(e: Event) -> None:
    assert set(e) == EVENT_FIELDS, e
    assert e["id"].startswith("ee_"), e
    assert TIMESTAMP.fullmatch(e["timestamp"]), e
    assert e["protocol"] in ("http", "tls", "tcp", "dns"), e
    assert e["verdict"] in ("allowed", "denied"), e
    assert e["mode"] in ("enforce", "warn"), e
    # allowed: let through; a rule matched, or warn mode let a denied destination through
    assert e["allowed"] == (e["verdict"] == "allowed" or e["mode"] == "warn"), e


Key = tuple[str | None, str, str | None, str | None, str, bool, str]


def key(e: Mapping[str, Any]) -> Key:
    """What an event says, without its id and time: (vm, protocol, host, cidr, verdict, allowed, mode)."""
    return (e["vm_id"], e["protocol"], e["host"], e["cidr"], e["verdict"], e["allowed"], e["mode"])


def ev(
    vm: Box,
    protocol: str,
    verdict: str,
    allowed: bool,
    mode: str,
    *,
    host: str | None = None,
    cidr: str | None = None,
) -> Key:
    return (vm.id, protocol, host, cidr, verdict, allowed, mode)


def not_dns(events: list[Event]) -> list[Event]:
    return [e for e in events if e["protocol"] != "dns"]


def _same(got: list[Key], expected: Sequence[Key | list[Key]]) -> bool:
    """Whether ``got`` is exactly ``expected`` as a multiset; a list in ``expected`` is one event that may
    be recorded in any of the listed ways."""
    left = list(got)
    for want in sorted(expected, key=lambda w: isinstance(w, list)):  # the exact ones first
        for option in want if isinstance(want, list) else [want]:
            if option in left:
                left.remove(option)
                break
        else:
            return False
    return not left


def wait_audit(
    client: httpx.Client, expected: Sequence[Key | list[Key]], timeout: float = AUDIT_WAIT, **params: Any
) -> list[Event]:
    """Polls the audit log (with ``params``) until its non-DNS events are exactly ``expected`` (as a
    multiset); fails with what it has after ``timeout`` seconds. Returns every event, DNS ones included."""
    deadline = time.monotonic() + timeout
    while True:
        events = audit_all(client, **params)
        got = [key(e) for e in not_dns(events)]
        if _same(got, expected):
            for e in events:
                if e["protocol"] == "dns":  # a denied lookup: accepted, not required
                    assert (e["verdict"], bool(e["host"]), e["cidr"]) == ("denied", True, None), e
            return events
        if time.monotonic() > deadline:
            flat = [k for w in expected for k in (w if isinstance(w, list) else [w])]
            missing = [w for w in expected if not any(k in got for k in (w if isinstance(w, list) else [w]))]
            extra = [k for k in got if k not in flat]
            raise AssertionError(
                f"audit log after {timeout} s: missing {missing}, unexpected {extra}, all: {sorted(got, key=repr)}"
            )
        time.sleep(0.1)


def ids(events: list[Event]) -> list[str]:
    return [e["id"] for e in events]


# ---- 1: what an allowlist lets through -----------------------------------------------------------------


def test_allowlisted_hosts_are_reachable_by_http_https_and_tcp(
    owner: Account, internet: FakeInternet
) -> None:
    add_rule(owner, host="allowed.test")
    add_rule(owner, cidr="198.18.2.0/24")
    add_rule(owner, host="*.wild.test")
    with sandbox(owner, internet=internet) as vm:
        mark = internet.mark()
        # raw TCP by address first: this sandbox has resolved no name for it, so the CIDR rule decides
        assert vm.tcp(ECHO) == {"result": "echo", "got": "corral-echo-probe\n"}
        arrived(internet, mark, "tcp", addr=ECHO, phase="open")
        arrived(internet, mark, "tcp", addr=ECHO, phase="close", bytes=len("corral-echo-probe\n"))

        r = vm.curl("http://allowed.test/allowed-http")
        assert (r.rc, r.code) == (0, 200), r
        assert r.json()["host_addr"] == ALLOWED
        assert r.json()["tls"] is False
        arrived(internet, mark, "http", addr=ALLOWED, path="/allowed-http", host="allowed.test")

        # passed through, not intercepted: the certificate is the fake internet's own
        r = vm.curl("--cacert", CA_PATH, "https://allowed.test/allowed-https")
        assert (r.rc, r.code) == (0, 200), r
        assert r.json()["host_addr"] == ALLOWED
        assert r.json()["sni"] == "allowed.test"
        arrived(internet, mark, "https", addr=ALLOWED, path="/allowed-https", sni="allowed.test")

        # *.wild.test: exactly one label more
        assert vm.dns("a.wild.test") == ("NOERROR", [WILD_A])
        r = vm.curl("http://a.wild.test/wild-a")
        assert (r.rc, r.code, r.json()["host_addr"]) == (0, 200, WILD_A), r
        r = vm.curl("--cacert", CA_PATH, "https://b.wild.test/wild-b")
        assert (r.rc, r.code, r.json()["host_addr"]) == (0, 200, WILD_B), r
        arrived(internet, mark, "http", addr=WILD_A, path="/wild-a")
        arrived(internet, mark, "https", addr=WILD_B, path="/wild-b", sni="b.wild.test")

        deep = internet.mark()
        assert vm.dns("deep.a.wild.test") == ("NXDOMAIN", [])
        assert vm.dns("wild.test") == ("NXDOMAIN", [])  # the parent itself is not matched either
        r = vm.curl("--resolve", f"deep.a.wild.test:80:{WILD_DEEP}", "http://deep.a.wild.test/deep")
        assert (r.code, r.body.strip()) == (403, BLOCKED), r
        r = vm.curl(
            "--cacert", CA_PATH, "--resolve", f"deep.a.wild.test:443:{WILD_DEEP}", "https://deep.a.wild.test/"
        )
        assert (r.rc != 0, r.code) == (True, 0), r
        time.sleep(0.3)
        assert (
            touching(internet.events_since(deep), addrs={WILD_DEEP}, names={"deep.a.wild.test", "wild.test"})
            == []
        )

        wait_audit(
            owner.client,
            [
                ev(vm, "tcp", "allowed", True, "enforce", cidr=f"{ECHO}/32"),
                ev(vm, "http", "allowed", True, "enforce", host="allowed.test"),
                ev(vm, "tls", "allowed", True, "enforce", host="allowed.test"),
                ev(vm, "http", "allowed", True, "enforce", host="a.wild.test"),
                ev(vm, "tls", "allowed", True, "enforce", host="b.wild.test"),
                ev(vm, "http", "denied", False, "enforce", host="deep.a.wild.test"),
                ev(vm, "tls", "denied", False, "enforce", host="deep.a.wild.test"),
            ],
        )


def test_raw_tcp_allowed_by_a_host_rule_after_the_sandbox_resolved_the_name(
    owner: Account, internet: FakeInternet
) -> None:
    add_rule(owner, host="tcp.test")
    with sandbox(owner) as vm:
        mark = internet.mark()
        # by address, before any lookup: no rule matches the address
        assert vm.tcp(ECHO)["result"] != "echo"
        time.sleep(0.3)
        assert touching(internet.events_since(mark, "tcp"), addrs={ECHO}) == []

        assert vm.dns("tcp.test") == ("NOERROR", [ECHO])
        assert vm.tcp("tcp.test") == {"result": "echo", "got": "corral-echo-probe\n"}
        arrived(internet, mark, "tcp", addr=ECHO, phase="open")
        # the address, now that the sandbox was given it for tcp.test, is matched by that name
        assert vm.tcp(ECHO)["result"] == "echo"

        wait_audit(
            owner.client,
            [
                ev(vm, "tcp", "denied", False, "enforce", cidr=f"{ECHO}/32"),
                ev(vm, "tcp", "allowed", True, "enforce", host="tcp.test"),
                ev(vm, "tcp", "allowed", True, "enforce", host="tcp.test"),
            ],
        )


# ---- 2: enforce mode ------------------------------------------------------------------------------------


def test_enforce_mode_stops_denied_destinations_before_the_internet(
    owner: Account, internet: FakeInternet
) -> None:
    add_rule(owner, host="allowed.test")
    with sandbox(owner, internet=internet) as vm:
        time.sleep(0.2)
        mark, before = internet.mark(), internet.counters()

        # DNS: NXDOMAIN from Corral's resolver, also when the sandbox asks the upstream server directly
        assert vm.dns("other.test") == ("NXDOMAIN", [])
        assert vm.dns("evil.test", server=DNS_ADDR) == ("NXDOMAIN", [])
        assert vm.dns("evil.test", server=DNS_ADDR, tcp=True) == ("NXDOMAIN", [])
        assert vm.dns("other.test", qtype="TXT") == ("NXDOMAIN", [])
        # HTTP: the proxy answers 403 itself (by name, and by address)
        r = vm.curl("--resolve", f"other.test:80:{OTHER}", "http://other.test/denied-http")
        assert (r.rc, r.code, r.body.strip()) == (0, 403, BLOCKED), r
        r = vm.curl(f"http://{EVIL}/denied-ip")
        assert (r.rc, r.code, r.body.strip()) == (0, 403, BLOCKED), r
        # HTTPS: refused by SNI (the connection is closed, no certificate is ever seen)
        r = vm.curl(
            "--cacert", CA_PATH, "--resolve", f"other.test:443:{OTHER}", "https://other.test/denied-tls"
        )
        assert (r.rc != 0, r.code) == (True, 0), r
        # raw TCP to an address no CIDR rule covers
        assert vm.tcp(ECHO)["result"] in ("closed", "error"), "raw TCP to an address outside every rule"
        # UDP other than DNS never leaves
        udp = (
            f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{OTHER}', 9999))"
        )
        assert vm.run(["python3", "-c", udp])["exit_code"] == 0

        time.sleep(0.3)
        assert internet.events_since(mark) == [], "a denied destination reached the fake internet"
        after = internet.counters()
        kinds = ("tcp", "udp_dns", "udp_other", "icmp")
        assert [after[k] for k in kinds] == [before[k] for k in kinds], (before, after)

        # the path itself works: the allowlisted host answers
        r = vm.curl("http://allowed.test/after-denials")
        assert (r.rc, r.code) == (0, 200), r

        events = wait_audit(
            owner.client,
            [
                ev(vm, "http", "denied", False, "enforce", host="other.test"),
                # a Host that is an address: recorded as that host, or as its /32
                [
                    ev(vm, "http", "denied", False, "enforce", host=EVIL),
                    ev(vm, "http", "denied", False, "enforce", cidr=f"{EVIL}/32"),
                ],
                ev(vm, "tls", "denied", False, "enforce", host="other.test"),
                ev(vm, "tcp", "denied", False, "enforce", cidr=f"{ECHO}/32"),
                ev(vm, "http", "allowed", True, "enforce", host="allowed.test"),
            ],
        )
        for e in events:
            assert (e["vm_id"], e["mode"]) == (vm.id, "enforce"), e


# ---- 3: warn mode ----------------------------------------------------------------------------------------


def test_warn_mode_lets_denied_destinations_through_and_records_them(
    owner: Account, internet: FakeInternet
) -> None:
    set_mode(owner, "warn")
    assert owner.client.get("/v1/egress/policy").json() == {"mode": "warn"}
    with sandbox(owner, internet=internet) as vm:
        mark = internet.mark()
        assert vm.dns("other.test") == ("NOERROR", [OTHER])
        arrived(internet, mark, "dns", qname="other.test")

        r = vm.curl("http://other.test/warn-http")
        assert (r.rc, r.code, r.json()["host_addr"]) == (0, 200, OTHER), r
        arrived(internet, mark, "http", addr=OTHER, path="/warn-http")

        r = vm.curl("--cacert", CA_PATH, "https://evil.test/warn-tls")
        assert (r.rc, r.code, r.json()["host_addr"]) == (0, 200, EVIL), r
        arrived(internet, mark, "https", addr=EVIL, path="/warn-tls", sni="evil.test")

        assert vm.tcp(ECHO)["result"] == "echo"
        arrived(internet, mark, "tcp", addr=ECHO, phase="open")

        events = wait_audit(
            owner.client,
            [
                ev(vm, "http", "denied", True, "warn", host="other.test"),
                ev(vm, "tls", "denied", True, "warn", host="evil.test"),
                ev(vm, "tcp", "denied", True, "warn", cidr=f"{ECHO}/32"),
            ],
        )
        for e in events:
            assert (e["verdict"], e["allowed"], e["mode"]) == ("denied", True, "warn"), e


# ---- 4: the audit log and its filters -------------------------------------------------------------------


def test_audit_log_filters_pagination_and_privacy(
    owner: Account, stranger: Account, internet: FakeInternet
) -> None:
    c = owner.client
    add_rule(owner, host="allowed.test")
    add_rule(owner, cidr="198.18.2.0/24")
    with sandboxes(owner, None, None, internet=internet) as (vm1, vm2):
        t0 = datetime.now(UTC)
        assert vm1.curl("http://allowed.test/audit-1").code == 200
        assert vm1.curl("--cacert", CA_PATH, "https://allowed.test/audit-2").code == 200
        assert vm1.tcp(ECHO)["result"] == "echo"
        assert vm1.curl("--resolve", f"other.test:80:{OTHER}", "http://other.test/audit-3").code == 403
        assert (
            vm2.curl("--cacert", CA_PATH, "--resolve", f"evil.test:443:{EVIL}", "https://evil.test/").rc != 0
        )
        t_mid = datetime.now(UTC)

        set_mode(owner, "warn")
        deadline = time.monotonic() + 3
        while vm2.dns("other.test")[0] != "NOERROR":  # DNS only: no http/tls/tcp event while waiting
            assert time.monotonic() < deadline, "warn mode did not apply"
        t_warn = datetime.now(UTC)
        assert vm2.curl("http://other.test/audit-4").code == 200
        assert vm1.tcp(ECHO)["result"] == "echo"
        t1 = datetime.now(UTC)

        phase1 = [
            ev(vm1, "http", "allowed", True, "enforce", host="allowed.test"),
            ev(vm1, "tls", "allowed", True, "enforce", host="allowed.test"),
            ev(vm1, "tcp", "allowed", True, "enforce", cidr=f"{ECHO}/32"),
            ev(vm1, "http", "denied", False, "enforce", host="other.test"),
            ev(vm2, "tls", "denied", False, "enforce", host="evil.test"),
        ]
        phase2 = [
            ev(vm2, "http", "denied", True, "warn", host="other.test"),
            ev(vm1, "tcp", "allowed", True, "warn", cidr=f"{ECHO}/32"),
        ]
        every = wait_audit(c, phase1 + phase2)
        # ordered by time, newest first by default; the times are those of the attempts
        stamps = [e["timestamp"] for e in every]
        assert stamps == sorted(stamps, reverse=True)
        low, high = (
            (t0 - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            t1.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        assert all(low <= s <= high for s in stamps), (low, stamps, high)

        def server(**params: Any) -> list[str]:
            return ids(audit_all(c, **params))

        def local(pred: Callable[[Event], bool]) -> list[str]:
            return [e["id"] for e in every if pred(e)]

        def inside(net: str) -> Callable[[Event], bool]:
            n = ipaddress.IPv4Network(net)
            return lambda e: e["cidr"] is not None and ipaddress.IPv4Network(e["cidr"]).subnet_of(n)

        checks: list[tuple[dict[str, Any], Callable[[Event], bool], int]] = [
            # filter, what it must select, at least how many non-DNS events that is
            ({"vm_id": vm1.id}, lambda e: e["vm_id"] == vm1.id, 5),
            ({"vm_id": vm2.id}, lambda e: e["vm_id"] == vm2.id, 2),
            ({"verdict": "denied"}, lambda e: e["verdict"] == "denied", 3),
            ({"verdict": "allowed"}, lambda e: e["verdict"] == "allowed", 4),
            ({"allowed": "false"}, lambda e: e["allowed"] is False, 2),
            ({"allowed": "true"}, lambda e: e["allowed"] is True, 5),
            ({"mode": "warn"}, lambda e: e["mode"] == "warn", 2),
            ({"mode": "enforce"}, lambda e: e["mode"] == "enforce", 5),
            ({"host": "allowed.test"}, lambda e: e["host"] == "allowed.test", 2),
            ({"host": "other.test"}, lambda e: e["host"] == "other.test", 2),
            ({"cidr": "198.18.0.0/16"}, inside("198.18.0.0/16"), 2),
            ({"cidr": f"{ECHO}/32"}, inside(f"{ECHO}/32"), 2),
            ({"cidr": "10.0.0.0/8"}, inside("10.0.0.0/8"), 0),
            ({"protocol": "http"}, lambda e: e["protocol"] == "http", 3),
            ({"protocol": "tls"}, lambda e: e["protocol"] == "tls", 2),
            ({"protocol": "tcp"}, lambda e: e["protocol"] == "tcp", 2),
            ({"vm_id": vm1.id, "protocol": "tcp", "mode": "warn"}, lambda e: key(e) == phase2[1], 1),
            (
                {"verdict": "denied", "allowed": "true"},
                lambda e: e["verdict"] == "denied" and e["allowed"],
                1,
            ),
        ]
        for params, pred, at_least in checks:
            got = server(**params)
            assert got == local(pred), params
            assert len([i for i in got if i in ids(not_dns(every))]) >= at_least, params
        assert len(not_dns(audit_all(c, host="allowed.test"))) == 2
        assert {key(e) for e in not_dns(audit_all(c, cidr="198.18.0.0/16"))} == {phase1[2], phase2[1]}

        # since/until are exclusive bounds on the attempts' times (ISO 8601, microseconds or a zone)
        assert sorted(key(e) for e in not_dns(audit_all(c, until=t_mid.isoformat()))) == sorted(phase1)
        assert sorted(key(e) for e in not_dns(audit_all(c, since=t_warn.isoformat()))) == sorted(phase2)
        assert server(since=t0.isoformat(), until=t1.isoformat()) == ids(every)
        assert server(since=low) == ids(every)
        assert server(since=t1.isoformat()) == []
        assert server(until=t0.isoformat()) == []

        # pagination: pages of 2 follow each other without gaps or repeats; asc is the exact reverse
        paged: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page = audit_page(c, limit=2, **({"cursor": cursor} if cursor else {}))
            assert len(page["data"]) <= 2
            paged += ids(page["data"])
            pages += 1
            if not page["has_more"]:
                assert page["cursor"] is None
                break
            assert page["cursor"]
            assert len(page["data"]) == 2
            cursor = page["cursor"]
        assert paged == ids(every)
        assert pages >= 4
        asc = audit_all(c, order="asc")
        assert ids(asc) == ids(every)[::-1]
        page = audit_page(c, limit=2, order="asc", verdict="denied")
        assert page["has_more"]
        assert ids(page["data"]) == [i for i in ids(asc) if i in server(verdict="denied")][:2]
        rest = audit_page(c, limit=500, order="asc", verdict="denied", cursor=page["cursor"])
        assert ids(page["data"]) + ids(rest["data"]) == [i for i in ids(asc) if i in server(verdict="denied")]
        assert audit_page(c)["data"] == every[:50]  # the default limit is 50

        # bad filters are refused
        for bad in (
            {"verdict": "maybe"},
            {"mode": "off"},
            {"protocol": "udp"},
            {"cidr": "nope"},
            {"since": "x"},
        ):
            resp = c.get("/v1/audit/egress", params=bad)
            assert resp.status_code == 400, (bad, resp.text)
            assert resp.json()["error"]["code"] == "invalid_parameter", (bad, resp.text)

        # another user sees none of it
        s = stranger.client
        assert audit_all(s) == []
        assert audit_all(s, vm_id=vm1.id) == []
        assert audit_all(s, host="allowed.test") == []
        assert audit_all(s, cidr="0.0.0.0/0") == []


# ---- 5: per-VM overrides --------------------------------------------------------------------------------


def test_per_vm_overrides_mode_and_rules(owner: Account, internet: FakeInternet) -> None:
    c = owner.client
    add_rule(owner, host="allowed.test")
    warn = {"mode": "warn"}
    extra = {"mode": None, "rules": [{"host": "other.test"}, {"cidr": f"{ECHO}/32"}]}
    with sandboxes(owner, warn, extra, None) as (vm_warn, vm_extra, vm_plain):
        assert vm_warn.vm["egress"] == {"mode": "warn", "rules": []}
        assert vm_extra.vm["egress"] == {
            "mode": None,
            "rules": [{"host": "other.test"}, {"cidr": f"{ECHO}/32"}],
        }
        assert vm_plain.vm["egress"] is None
        listed = {vm["id"]: vm.get("egress") for vm in c.get("/v1/vms", params={"limit": 100}).json()["data"]}
        assert listed[vm_warn.id] == vm_warn.vm["egress"]
        assert listed[vm_extra.id] == vm_extra.vm["egress"]
        assert c.get("/v1/egress/policy").json() == {"mode": "enforce"}

        mark = internet.mark()
        # the account's enforce mode holds for the plain VM
        assert vm_plain.dns("other.test") == ("NXDOMAIN", [])
        r = vm_plain.curl("--resolve", f"other.test:80:{OTHER}", "http://other.test/plain")
        assert (r.code, r.body.strip()) == (403, BLOCKED), r
        assert vm_plain.tcp(ECHO)["result"] != "echo"
        time.sleep(0.3)
        assert internet.events_since(mark) == []

        # the VM in warn mode gets through to a host no rule allows
        r = vm_warn.curl("http://other.test/vm-warn")
        assert (r.code, r.json()["host_addr"]) == (200, OTHER), r
        arrived(internet, mark, "http", addr=OTHER, path="/vm-warn")

        # the VM with its own rules reaches what the others of the account cannot
        r = vm_extra.curl("http://other.test/vm-extra")
        assert (r.code, r.json()["host_addr"]) == (200, OTHER), r
        arrived(internet, mark, "http", addr=OTHER, path="/vm-extra")
        assert vm_extra.tcp(ECHO)["result"] == "echo"
        # and the account's rules still apply to it
        assert vm_extra.curl("http://allowed.test/vm-extra-account").code == 200
        assert vm_extra.curl("--resolve", f"evil.test:80:{EVIL}", "http://evil.test/").code == 403

        wait_audit(
            c,
            [
                ev(vm_plain, "http", "denied", False, "enforce", host="other.test"),
                ev(vm_plain, "tcp", "denied", False, "enforce", cidr=f"{ECHO}/32"),
                ev(vm_warn, "http", "denied", True, "warn", host="other.test"),
                ev(vm_extra, "http", "allowed", True, "enforce", host="other.test"),
                ev(vm_extra, "tcp", "allowed", True, "enforce", cidr=f"{ECHO}/32"),
                ev(vm_extra, "http", "allowed", True, "enforce", host="allowed.test"),
                ev(vm_extra, "http", "denied", False, "enforce", host="evil.test"),
            ],
        )
        # the override is the VM's own: its owner's account is still in enforce mode for the others
        assert audit_all(c, vm_id=vm_plain.id, mode="warn") == []


def test_bad_per_vm_overrides_are_refused_and_create_nothing(owner: Account) -> None:
    c = owner.client
    bad: list[Any] = [
        {"rules": [{"host": "allowed.test", "cidr": "198.18.1.0/24"}]},  # both
        {"rules": [{}]},  # neither
        {"rules": [{"cidr": "198.18.1.300/32"}]},
        {"rules": [{"cidr": "not-a-network"}]},
        {"rules": [{"cidr": "198.18.1.1/24"}]},  # host bits set
        {"rules": [{"host": "*"}]},
        {"rules": [{"host": "a.*.test"}]},
        {"rules": [{"host": "bad host!"}]},
        {"mode": "block"},
        {"mode": "WARN"},
        {"mode": "warn", "allow_all": True},  # unknown field
        {"rules": [{"host": "allowed.test", "port": 443}]},  # unknown field in a rule
        {"rules": "allowed.test"},
        "warn",
    ]
    names = []
    for egress in bad:
        name = vmtools.unique_name("bad")
        names.append(name)
        resp = c.post("/v1/vms", json={"name": name, "public_key": vmtools.public_key(), "egress": egress})
        assert resp.status_code == 422, (egress, resp.text)
        error = resp.json()["error"]
        assert (error["code"], bool(error["message"])) == ("validation_error", True), (egress, error)
    listed = c.get("/v1/vms", params={"limit": 100}).json()["data"]
    assert [vm["name"] for vm in listed if vm["name"] in names] == []
    assert listed == [], "a refused create left a VM"


# ---- 6: changes apply within a second -------------------------------------------------------------------


def _flip(vm: Box, want: str, change: Callable[[], None]) -> float:
    """Polls other.test from inside ``vm`` (by name and by address with Host) while ``change`` runs; returns
    the seconds from the end of ``change`` (its API response) to the start of the first try in state
    ``want``. Every try before ``change`` must have seen the other state."""
    result: dict[str, Any] = {}

    def poll() -> None:
        try:
            result["tries"] = vm.python(POLL, want, "5")
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    time.sleep(0.4)  # the poller is running and has seen the old state
    started = time.time()
    change()
    done = time.time()
    thread.join(timeout=30)
    if "error" in result:
        raise result["error"]
    tries: list[list[Any]] = result["tries"]
    ok = [t for t in tries if t[1] == "ok" and t[2] == "ok"]
    denied = [t for t in tries if t[1] != "ok" and t[2] != "ok"]
    old, new = (denied, ok) if want == "ok" else (ok, denied)
    assert tries[0][0] < started, "the poller started late"
    assert tries[0] in old, f"the state before the change was not the old one: {tries[:3]}"
    assert new, f"never {want} within 5 s of the change: {tries[-3:]}"
    flipped: float = new[0][0]
    return flipped - done


def test_policy_and_rule_changes_apply_to_new_connections_within_a_second(
    owner: Account, internet: FakeInternet
) -> None:
    c = owner.client
    with sandbox(owner) as vm:
        rule: list[str] = []

        def add() -> None:
            rule.append(add_rule(owner, host="other.test"))

        def delete() -> None:
            assert c.delete(f"/v1/egress/rules/{rule[0]}").status_code == 204

        took = {
            "rule added": _flip(vm, "ok", add),
            "rule deleted": _flip(vm, "denied", delete),
            "enforce -> warn": _flip(vm, "ok", lambda: set_mode(owner, "warn")),
            "warn -> enforce": _flip(vm, "denied", lambda: set_mode(owner, "enforce")),
        }
        print("changes applied after (s):", {k: round(v, 3) for k, v in took.items()})
        for what, seconds in took.items():
            assert seconds < CHANGE_DEADLINE, f"{what}: applied after {seconds:.3f} s"


# ---- 7: keep-alive, Host and SNI checks -----------------------------------------------------------------


def test_keepalive_host_switch_and_spoofed_names_are_caught(owner: Account, internet: FakeInternet) -> None:
    add_rule(owner, host="allowed.test")
    with sandbox(owner, internet=internet) as vm:
        mark = internet.mark()
        out = vm.python(KEEPALIVE)
        assert out["first"][0] == 200, out
        assert json.loads(out["first"][1])["host_addr"] == ALLOWED, out
        assert (out["open_after_first"], out["same_socket"]) == (True, True), f"not one connection: {out}"
        assert (out["second"][0], out["second"][1].strip()) == (403, BLOCKED), out
        arrived(internet, mark, "http", addr=ALLOWED, path="/keepalive-first")

        # SNI allowed.test, sent to evil's address: the proxy connects to allowed.test's own address
        r = vm.curl(
            "--cacert", CA_PATH, "--resolve", f"allowed.test:443:{EVIL}", "https://allowed.test/spoof-sni"
        )
        assert (r.rc, r.code) == (0, 200), r
        assert r.json()["host_addr"] == ALLOWED
        assert r.json()["sni"] == "allowed.test"
        arrived(internet, mark, "https", addr=ALLOWED, path="/spoof-sni")

        # Host allowed.test, sent to evil's address: the same, for plain HTTP
        r = vm.curl("-H", "Host: allowed.test", f"http://{EVIL}/spoof-host")
        assert (r.rc, r.code) == (0, 200), r
        assert r.json()["host_addr"] == ALLOWED
        arrived(internet, mark, "http", addr=ALLOWED, path="/spoof-host")

        # SNI evil.test, sent to allowed.test's address: denied by its name
        r = vm.curl(
            "--cacert", CA_PATH, "--resolve", f"evil.test:443:{ALLOWED}", "https://evil.test/spoof-evil"
        )
        assert (r.rc != 0, r.code) == (True, 0), r

        time.sleep(0.3)
        events = internet.events_since(mark)
        assert touching(events, addrs={OTHER, EVIL}, names={"other.test", "evil.test"}) == [], events
        assert [e for e in events if e.get("path") in ("/keepalive-second", "/spoof-evil")] == []
        assert internet.events_since(mark, "tls_error") == []

        wait_audit(
            owner.client,
            [
                ev(vm, "http", "allowed", True, "enforce", host="allowed.test"),
                ev(vm, "http", "denied", False, "enforce", host="other.test"),
                ev(vm, "tls", "allowed", True, "enforce", host="allowed.test"),
                ev(vm, "http", "allowed", True, "enforce", host="allowed.test"),
                ev(vm, "tls", "denied", False, "enforce", host="evil.test"),
            ],
        )


# Run inside a sandbox: connect to argv[1]:80 and send argv[2] (two pipelined requests); prints the status
# of every response that came back before the server closed.
PIPELINE = r"""
import json, re, socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=5)
s.sendall(sys.argv[2].encode())
got = b""
try:
    while data := s.recv(65536):
        got += data
except OSError:
    pass
print(json.dumps([int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", got)]))
"""


@pytest.mark.parametrize("method", ["get", "M-SEARCH"])
def test_keepalive_host_switch_is_caught_whatever_the_first_method(
    owner: Account, internet: FakeInternet, method: str
) -> None:
    """Like the keep-alive check above, but the connection's first request uses a method that is a valid
    HTTP token though not 3-12 upper-case letters (methods are case-sensitive tokens: ``get``, ``M-SEARCH``
    of SSDP). The second request on the same connection asks for Host: other.test: the proxy must refuse it
    and record it, as it does after a ``GET``."""
    add_rule(owner, host="allowed.test")
    with sandbox(owner) as vm:
        assert vm.dns("allowed.test") == ("NOERROR", [ALLOWED])
        mark = internet.mark()
        requests = (
            f"{method} /odd-first HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
            "GET /odd-second HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n"
        )
        statuses = vm.python(PIPELINE, ALLOWED, requests)
        time.sleep(0.3)
        smuggled = [e for e in internet.events_since(mark, "http") if e.get("path") == "/odd-second"]
        assert smuggled == [], f"Host: other.test passed unchecked after a {method!r} request: {smuggled}"
        assert statuses[1:] == [403], statuses
        wait_audit(
            owner.client,
            [
                ev(vm, "http", "allowed", True, "enforce", host="allowed.test"),
                ev(vm, "http", "denied", False, "enforce", host="other.test"),
            ],
        )
