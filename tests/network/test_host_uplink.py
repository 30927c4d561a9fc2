"""The gateway with the host as its uplink (what `corral serve` uses by default): traffic from the gateway
is forwarded and masqueraded by the host to its network, and may open nothing on the host itself. The
"network" here is a namespace the test makes and joins to the host by a veth of its own."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.net.gateway import Gateway
from corral.net.plan import NetPlan

FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
# a minimal HTTP server (http.server would look its address up in DNS, which must not leave the test)
HTTP_SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("100.127.66.10", 8080))
s.listen(16)
while True:
    c, peer = s.accept()
    c.recv(65536)
    body = peer[0].encode()
    c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
    c.close()
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def outside() -> Iterator[str]:
    """A namespace standing for the host's network: 100.127.66.10/30 behind the host's 100.127.66.9, with
    an HTTP server that logs who connected."""
    tag = secrets.token_hex(3)
    ns, host_if = f"cho-{tag}", f"cho-{tag}"
    forward_before = FORWARD.read_text()
    sh("ip", "netns", "add", ns)
    server: subprocess.Popen[str] | None = None
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", "100.127.66.9/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", ns, "addr", "add", "100.127.66.10/30", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", "100.127.66.9")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", HTTP_SERVER],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(100):
            if sh("ip", "netns", "exec", ns, "ss", "-ltn", check=False).stdout.count(":8080"):
                break
            subprocess.run(["sleep", "0.05"], check=False)
        yield ns
    finally:
        if server is not None:
            server.kill()
            server.wait()
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", ns, check=False)
        FORWARD.write_text(forward_before)


def test_host_uplink_forwards_masquerades_and_shields_the_host(outside: str) -> None:
    plan = NetPlan(gateway_ns=f"cgw-{secrets.token_hex(3)}", uplink="host", uplink_subnet="100.127.66.0/30")
    gw = Gateway(plan)
    try:
        gw.ensure()
        gw.ensure()  # idempotent: a restarted server keeps what exists
        assert Path(f"/sys/class/net/{plan.outside_if}").exists()
        assert FORWARD.read_text().strip() == "1"
        assert plan.host_table in sh("nft", "list", "tables").stdout
        # the gateway (where the proxy runs) reaches the outside, seen there as the host (masquerade)
        out = sh(
            "ip", "netns", "exec", plan.gateway_ns,
            "curl", "-sS", "-m", "5", "http://100.127.66.10:8080/",
        )  # fmt: skip
        assert out.stdout == "100.127.66.9", "the outside sees the host's address, not the gateway's"
        # ... but opens nothing on the host: not at the uplink's host end, nor at another host address
        for address in (plan.uplink_outside_addr, "100.127.66.9"):
            probe = sh(
                "ip", "netns", "exec", plan.gateway_ns,
                "curl", "-sS", "-m", "2", f"http://{address}:8080/",
                check=False,
            )  # fmt: skip
            assert probe.returncode != 0, probe
    finally:
        gw.teardown()
    assert not Path(f"/sys/class/net/{plan.outside_if}").exists()
    assert plan.host_table not in sh("nft", "list", "tables").stdout
    assert not Path(f"/run/netns/{plan.gateway_ns}").exists()
