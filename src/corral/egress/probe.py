"""End-to-end probes of the egress process, made from inside the gateway namespace (the caller's thread must
be there): a request to the proxy's port, answered by the proxy's own addon with its health line, and a DNS
query to the resolver. A stopped or deadlocked process accepts the TCP connection (the kernel does) but never
answers: the probe times out."""

from __future__ import annotations

import random
import socket
import time
from dataclasses import dataclass

from dnslib import DNSRecord

from corral.egress.addon import PROBE_REQUEST

LOOPBACK = "127.0.0.1"
PROBE_NAME = "probe.corral.invalid"


@dataclass(frozen=True)
class ProbeResult:
    answered: bool  # the process answered at all (else: restart it)
    problem: str | None = None  # why the part is not ready (None: ready)


def probe_proxy(port: int, timeout: float) -> ProbeResult:
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(PROBE_REQUEST)
            data = b""
            while len(data) < 512 and not data.endswith(b"\n"):
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(512)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        return ProbeResult(False, f"the proxy did not answer within {timeout:g} s")
    except OSError as exc:
        return ProbeResult(False, f"the proxy refused the probe ({exc.strerror or exc})")
    line = data.decode("ascii", "replace").strip()
    if not line.startswith("corral-egress "):
        return ProbeResult(False, f"the proxy answered {line[:100]!r}")
    state = line.removeprefix("corral-egress ")
    if not state.startswith("ok"):
        return ProbeResult(True, f"the proxy has no current policy ({state[:100]})")
    return ProbeResult(True)


def probe_resolver(port: int, timeout: float) -> ProbeResult:
    query = DNSRecord.question(PROBE_NAME, "A")
    query.header.id = random.randint(0, 0xFFFF)  # noqa: S311 -- a query id, not a secret
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((LOOPBACK, port))
            sock.sendall(query.pack())
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                reply = DNSRecord.parse(sock.recv(4096))
                if reply.header.id == query.header.id and reply.header.qr:
                    return ProbeResult(True)
    except TimeoutError:
        return ProbeResult(False, f"the resolver did not answer within {timeout:g} s")
    except OSError as exc:
        return ProbeResult(False, f"the resolver refused the probe ({exc.strerror or exc})")
    except Exception as exc:  # a reply that does not parse
        return ProbeResult(False, f"the resolver answered garbage ({type(exc).__name__})")
