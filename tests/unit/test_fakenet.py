"""The fake internet fixture (tests/fakenet.py) on the real kernel: a client namespace made here, joined to the
fake internet by a veth, reaches its servers with real clients, and every event is logged and counted.
All traffic goes to addresses in namespaces these tests made (the client's only route is the veth)."""

from __future__ import annotations

import functools
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import dnslib  # type: ignore[import-untyped, unused-ignore]  # dnslib ships no types
import pytest

from tests.fakenet import (
    DNS_ADDR,
    ECHO_PORT,
    HOSTS,
    UDP_PORT,
    FakeInternet,
    add_netns,
    call_in_netns,
    del_netns,
    make_certificates,
    netns_names,
    run_in,
)

pytestmark = pytest.mark.kernel

CLIENT_ADDR = "100.127.99.2"
FAKE_SIDE_ADDR = "100.127.99.1"
FAKE_SIDE_IF = "fiup"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[FakeInternet]:
    with FakeInternet.start(tmp_path) as fake:
        yield fake
    assert fake.name not in netns_names()
    assert not fake.running


@pytest.fixture
def client(net: FakeInternet) -> Iterator[str]:
    """A namespace with one veth into the fake internet (IPv6 off, so nothing but what a test sends
    arrives there), its default route through it."""
    name = add_netns("cfc-")
    try:
        run_in(
            name,
            [
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6;"
                " echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
            ],
        )
        ip_batch(name, ["link set lo up", f"link add eth0 type veth peer name {FAKE_SIDE_IF}"])
        ip_batch(name, [f"link set {FAKE_SIDE_IF} netns {net.name}"])
        ip_batch(
            net.name, [f"addr add {FAKE_SIDE_ADDR}/30 dev {FAKE_SIDE_IF}", f"link set {FAKE_SIDE_IF} up"]
        )
        ip_batch(
            name,
            [
                f"addr add {CLIENT_ADDR}/30 dev eth0",
                "link set eth0 up",
                f"route add default via {FAKE_SIDE_ADDR}",
            ],
        )
        yield name
    finally:
        del_netns(name)
    assert name not in netns_names()


def ip_batch(ns: str, commands: list[str]) -> None:
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n", text=True, check=True)


def curl(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_in(ns, ["curl", "-sS", "--noproxy", "*", "--max-time", "10", *args], check=False)


def test_http_by_address_with_host_header(net: FakeInternet, client: str) -> None:
    before = net.counters()
    out = curl(client, "-H", "Host: allowed.test", "-H", "X-Probe: Mixed-Case", "http://198.18.1.1/hello?x=1")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["host_addr"] == "198.18.1.1"
    assert body["method"] == "GET"
    assert body["path"] == "/hello?x=1"
    assert body["tls"] is False
    assert body["sni"] is None
    assert ["Host", "allowed.test"] in body["headers"]
    assert ["X-Probe", "Mixed-Case"] in body["headers"]

    event = net.wait_for("http", {"path": "/hello?x=1"})
    assert event["addr"] == "198.18.1.1"
    assert event["peer"] == CLIENT_ADDR
    assert event["host"] == "allowed.test"
    assert event["method"] == "GET"
    assert net.counters()["tcp"] > before["tcp"]


def test_http_keep_alive_and_request_bodies(net: FakeInternet, client: str) -> None:
    def talk() -> list[dict[str, Any]]:
        conn = http.client.HTTPConnection("198.18.1.2", 80, timeout=5)
        answers = []
        for method, body in (("POST", b"a" * 100_000), ("PUT", b"b" * 3), ("GET", None)):
            conn.request(method, f"/{method.lower()}", body=body, headers={"Host": "other.test"})
            resp = conn.getresponse()
            assert resp.status == 200
            answers.append(json.loads(resp.read()))
        conn.close()
        return answers

    answers = call_in_netns(client, talk)
    assert [a["body_len"] for a in answers] == [100_000, 3, 0]
    assert len({a["peer_port"] for a in answers}) == 1  # one connection for all three
    assert [e["method"] for e in net.events("http")] == ["POST", "PUT", "GET"]


def test_large_download_streams(net: FakeInternet, client: str) -> None:
    out = curl(
        client, "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "http://198.18.1.1/bytes/5000000"
    )
    assert out.stdout == "200 5000000", out.stderr


def test_https_verifies_with_the_ca_and_logs_sni(net: FakeInternet, client: str, tmp_path: Path) -> None:
    for host in ("allowed.test", "deep.a.wild.test"):
        out = curl(
            client, "--resolve", f"{host}:443:198.18.1.1", "--cacert", str(net.ca_pem), f"https://{host}/s"
        )
        assert out.returncode == 0, out.stderr
        body = json.loads(out.stdout)
        assert body["tls"] is True
        assert body["sni"] == host
        assert body["host_addr"] == "198.18.1.1"  # the certificate follows SNI, not the address
        event = net.wait_for("https", {"sni": host})
        assert event["peer"] == CLIENT_ADDR
        assert event["path"] == "/s"

    mark = net.mark()
    (tmp_path / "stranger").mkdir()
    stranger_ca, _ = make_certificates(tmp_path / "stranger", [])
    out = curl(
        client,
        "--resolve",
        "allowed.test:443:198.18.1.1",
        "--cacert",
        str(stranger_ca),
        "https://allowed.test/",
    )
    assert out.returncode == 60, out.stderr  # a certificate from another CA is not trusted
    assert net.wait_for("tls_error", {"sni": "allowed.test"}, since=mark)
    assert net.events_since(mark, "https") == []


def test_https_without_sni_gets_the_certificate_of_the_address(net: FakeInternet, client: str) -> None:
    def peer_names() -> list[str]:
        ctx = ssl.create_default_context(cafile=str(net.ca_pem))
        ctx.check_hostname = False
        with (
            socket.create_connection((HOSTS["api.secret.test"], 443), timeout=5) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            cert = tls.getpeercert()
            tls.sendall(b"GET /nosni HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while tls.recv(65536):
                pass
        assert cert is not None
        sans = cast(tuple[tuple[str, str], ...], cert["subjectAltName"])
        return [value for _, value in sans]

    assert call_in_netns(client, peer_names) == ["api.secret.test"]
    event = net.wait_for("https", {"path": "/nosni"})
    assert event["sni"] is None
    assert event["addr"] == HOSTS["api.secret.test"]


def test_dns_over_udp_and_tcp(net: FakeInternet, client: str) -> None:
    def ask(name: str, qtype: str, tcp: bool) -> Any:
        query = dnslib.DNSRecord.question(name, qtype)
        return dnslib.DNSRecord.parse(query.send(DNS_ADDR, 53, tcp=tcp, timeout=5))

    before = net.counters()
    for tcp in (False, True):
        proto = "tcp" if tcp else "udp"
        known = call_in_netns(client, functools.partial(ask, "a.wild.test", "A", tcp))
        assert known.header.rcode == dnslib.RCODE.NOERROR
        assert [(str(rr.rdata), rr.ttl) for rr in known.rr] == [(HOSTS["a.wild.test"], 60)]
        aaaa = call_in_netns(client, functools.partial(ask, "a.wild.test", "AAAA", tcp))
        assert aaaa.header.rcode == dnslib.RCODE.NOERROR
        assert aaaa.rr == []
        unknown = call_in_netns(client, functools.partial(ask, "nowhere.example", "A", tcp))
        assert unknown.header.rcode == dnslib.RCODE.NXDOMAIN
        asked = [(e["qname"], e["qtype"]) for e in net.events("dns") if e["proto"] == proto]
        assert asked == [("a.wild.test", "A"), ("a.wild.test", "AAAA"), ("nowhere.example", "A")]
        assert all(e["peer"] == CLIENT_ADDR and e["addr"] == DNS_ADDR for e in net.events("dns"))

    after = net.counters()
    assert after["udp_dns"] - before["udp_dns"] == 3  # one packet per UDP query
    assert after["tcp"] > before["tcp"]


def test_tcp_echo(net: FakeInternet, client: str) -> None:
    payload = os.urandom(200_000)

    def echo() -> bytes:
        with socket.create_connection((HOSTS["tcp.test"], ECHO_PORT), timeout=5) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            got = bytearray()
            while data := sock.recv(65536):
                got += data
        return bytes(got)

    assert call_in_netns(client, echo) == payload
    closed = net.wait_for("tcp", {"phase": "close"})
    assert closed["bytes"] == len(payload)
    assert closed["peer"] == CLIENT_ADDR
    assert closed["addr"] == HOSTS["tcp.test"]


def test_udp_is_logged_and_counted(net: FakeInternet, client: str) -> None:
    before = net.counters()

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"hello fake", (HOSTS["other.test"], UDP_PORT))

    call_in_netns(client, send)
    event = net.wait_for("udp", {"addr": HOSTS["other.test"]})
    assert event["bytes"] == len(b"hello fake")
    assert event["peer"] == CLIENT_ADDR
    assert bytes.fromhex(event["data_hex"]) == b"hello fake"
    after = net.counters()
    assert after["udp_other"] - before["udp_other"] == 1
    assert after["udp_dns"] == before["udp_dns"]


def test_ping_is_counted_and_nothing_else_arrives(net: FakeInternet, client: str) -> None:
    if shutil.which("ping") is not None:
        out = run_in(client, ["ping", "-c", "2", "-i", "0.2", "-W", "2", HOSTS["evil.test"]], check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        assert net.counters()["icmp"] == 2
    counters = net.counters()
    assert counters["ip6"] == 0  # the client has no IPv6; what the fake side itself sends is not counted
    assert counters["other"] == 0
    assert counters["tcp"] == counters["udp_dns"] == counters["udp_other"] == 0
    assert net.events() == []


def test_mark_and_events_since(net: FakeInternet, client: str) -> None:
    assert curl(client, "http://198.18.1.4/one").returncode == 0
    mark = net.mark()
    assert net.events_since(mark) == []
    assert curl(client, "http://198.18.1.4/two").returncode == 0
    assert [e["path"] for e in net.events_since(mark)] == ["/two"]
    assert [e["path"] for e in net.events("http")] == ["/one", "/two"]


def test_close_leaves_nothing(tmp_path: Path) -> None:
    net = FakeInternet.start(tmp_path)
    pid = net.pid
    assert pid is not None
    assert net.name in netns_names()
    net.close()
    net.close()  # idempotent
    assert net.name not in netns_names()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("import sys\nsys.stderr.write('boom: no servers\\n')\nsys.exit(3)\n", "boom: no servers"),
        ("import time\ntime.sleep(60)\n", "not ready"),
    ],
    ids=["exits", "hangs"],
)
def test_failed_start_leaves_nothing(tmp_path: Path, script: str, message: str) -> None:
    bad = tmp_path / "bad_servers.py"
    bad.write_text(script)
    before = netns_names()
    net = FakeInternet(tmp_path, servers_script=bad, ready_timeout=0.5)
    with pytest.raises(RuntimeError, match=message):
        net.open()
    assert net.name.startswith("cfi-")  # it got as far as the namespace
    assert netns_names() <= before
    assert not net.running
    net.close()  # closing again after a failed start is harmless
    assert netns_names() <= before
