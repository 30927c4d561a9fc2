"""Corral's mitmproxy addon: the decision on every connection a sandbox opens, and on every HTTP request in
one the proxy can read.

The first bytes decide (the proxy runs with ``connection_strategy=lazy``: nothing is connected upstream
before the decision):
- a TLS ClientHello: by its SNI. Allowed names are resolved by the proxy's own resolver and connected to by
  that address, never the address the sandbox chose (so SNI cannot smuggle a connection elsewhere). Passed
  through untouched, unless a secret of the owner is scoped to the name: then intercepted (the installation's
  CA) so the placeholder can be replaced.
- an HTTP request: each request by its Host header, resolved the same way (so a keep-alive connection cannot
  switch hosts unchecked).
- anything else (or TLS without SNI): raw TCP, by the destination address (CIDR rules) or by the name the
  sandbox resolved through Corral's DNS to that address.
Addresses of the platform (other sandboxes, the gateway, loopback, link-local) are refused in every mode.

The bytes of every allowed connection are counted as they pass (``count_bytes``: up from the sandbox, down
to it, TLS and HTTP framing included); the event of an allowed connection, or of an HTTP request, is sent
again with the bytes it carried when the connection closes or the next request on it is decided."""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from mitmproxy import http, tcp
from mitmproxy.addons.next_layer import NextLayer
from mitmproxy.connection import Client
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tls import parse_client_hello

from corral.domain.egress_policy import Decision, Forbidden, is_ip_literal, normalise_host, split_host_port
from corral.domain.ids import Prefix, new_id
from corral.egress.dns import NameMemory, Resolver, UpstreamError
from corral.egress.inject import Injector
from corral.egress.limits import Caps, Counts, Throttle, held_note
from corral.egress.state import VmEntry
from corral.services.audit import NewEvent

log = logging.getLogger(__name__)

# an HTTP/1 request line (the method is any RFC 9110 token), or HTTP/2's preface
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HTTP_START = re.compile(rb"^" + _TOKEN + rb" \S+ HTTP/\d(?:\.\d)?\r?\n|^PRI \* HTTP/2\.0\r\n")
# the start of a request line cut short (method, a space, then no line end yet): wait for the rest
_HTTP_PREFIX = re.compile(rb"^" + _TOKEN + rb" [^\r\n]*$")
MAX_REQUEST_LINE = 16384
MAX_UNDECIDED = 64 * 1024  # bytes a connection may send before it is decided (a ClientHello fits easily)
# one sandbox cannot hold every descriptor of the proxy, which all sandboxes of the node share
MAX_CONNECTIONS_PER_VM = 1024
FIRST_BYTE_TIMEOUT = 30.0  # seconds a connection may stay undecided (silent, or a start cut short)
BLOCKED_BODY = b"Blocked by the Corral egress policy.\n"
# the supervisor's end-to-end probe, from the gateway's own loopback (no sandbox can send from there)
PROBE_REQUEST = b"CORRAL-EGRESS-PROBE\n"
LOG_EVERY = 10.0  # seconds between two log lines about the same refusal


def audit_host(name: str | None) -> str | None:
    """A name as the audit log stores it: printable ASCII, at most 253 characters (a sandbox chooses SNI
    and Host freely; anything else is escaped, and an over-long name is cut and marked)."""
    if name is None:
        return None
    text = name.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(ch if 32 < ord(ch) < 127 else f"\\x{ord(ch):02x}" for ch in text)
    return text if len(text) <= 253 else text[:250] + "..."


def audit_event(
    vm: VmEntry, protocol: str, decision: Decision, host: str | None, address: str | None, at: datetime
) -> NewEvent:
    """The audit event of one decision: the name sanitised, the address as a /32 when there is no name."""
    host = audit_host(host)
    return NewEvent(
        user_id=vm.user_id,
        timestamp=at,
        vm_id=vm.vm_id,
        host=host,
        cidr=None if host or not address else f"{address}/32",
        protocol=protocol,
        verdict=decision.verdict,
        allowed=decision.allowed,
        mode=decision.mode,
    )


@dataclass
class Traffic:
    """Bytes of one connection so far, and the allowed event they are counted for since ``mark``."""

    up: int = 0
    down: int = 0
    event: NewEvent | None = None
    mark: tuple[int, int] = (0, 0)

    def settle(self) -> NewEvent | None:
        """The open event with the bytes since its mark (None when there is none); the next starts here."""
        event, self.event = self.event, None
        if event is None:
            return None
        up, down = self.up - self.mark[0], self.down - self.mark[1]
        self.mark = (self.up, self.down)
        return replace(event, bytes_up=up, bytes_down=down)


@dataclass
class Conn:
    vm: VmEntry
    protocol: str  # http | tls | tcp
    sni: str | None = None
    intercepted: bool = False
    port: int = 0
    traffic: Traffic = field(default_factory=Traffic)
    opened: float = 0.0  # monotonic time of the accept
    decided: bool = False  # a top layer was chosen (until then the first-byte timeout applies)


def count_bytes(chosen: layer.Layer, traffic: Traffic) -> layer.Layer:
    """``chosen`` (the top layer of a connection) counting every byte received from either side before it
    handles it: the top layer sees every event of the connection, for the client and every server."""
    inner = chosen.handle_event
    client = chosen.context.client

    def handle_event(event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            if event.connection is client:
                traffic.up += len(event.data)
            else:
                traffic.down += len(event.data)
        return inner(event)

    chosen.handle_event = handle_event  # type: ignore[method-assign]
    return chosen


class TopLevelOnly(NextLayer):
    """mitmproxy's protocol detection, for layers inside a connection only: the top-level decision is
    Corral's alone (when Corral waits for more bytes, this must not decide in its place)."""

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if len(nextlayer.context.layers) == 1:
            return
        super().next_layer(nextlayer)


class _Refuse(layer.Layer):
    """Close the client's connection at once (a denied connection)."""

    def _handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        if isinstance(event, events.Start | events.DataReceived):
            self._handle_event = self._done  # type: ignore[method-assign]
            yield commands.CloseConnection(self.context.client)

    def _done(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        yield from ()


class _Reply(_Refuse):
    """Send ``reply`` and close (the answer to the supervisor's probe)."""

    def __init__(self, context: Any, reply: bytes) -> None:
        super().__init__(context)
        self.reply = reply

    def _handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        if isinstance(event, events.Start | events.DataReceived):
            self._handle_event = self._done  # type: ignore[method-assign]
            yield commands.SendData(self.context.client, self.reply)
            yield commands.CloseConnection(self.context.client)


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class EgressAddon:
    def __init__(
        self,
        *,
        identify: Callable[[str], Awaitable[VmEntry | None]],
        resolver: Resolver,
        memory: NameMemory,
        forbidden: Forbidden,
        audit: Callable[[NewEvent], None],
        now: Callable[[], datetime],
        max_per_vm: int = MAX_CONNECTIONS_PER_VM,
        caps: Caps | None = None,
        first_byte_timeout: float = FIRST_BYTE_TIMEOUT,
        health: Callable[[], str] = lambda: "ok",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identify = identify
        self.resolver = resolver
        self.memory = memory
        self.forbidden = forbidden
        self.audit = audit
        self.now = now
        self.conns: dict[str, Conn] = {}
        self.counts = Counts(caps or Caps(per_vm=max_per_vm))
        self.first_byte_timeout = first_byte_timeout
        self.health = health
        self.clock = clock
        self.probes: dict[str, float] = {}  # client id -> accepted at (the supervisor's probes)
        self.refused = 0  # connections refused at accept (unknown address or a cap)
        self.expired = 0  # connections closed undecided by the first-byte timeout
        self._throttle = Throttle(LOG_EVERY, clock)

    # ---- bookkeeping ----------------------------------------------------------------------------------------

    @property
    def open_per_vm(self) -> dict[str, int]:
        return self.counts.by_vm

    async def client_connected(self, client: Client) -> None:
        """Every accepted connection is identified and counted at once, before it sends anything: one over
        a cap of its VM, its owner or the node is closed right away (``client.error``)."""
        address = str(client.peername[0])
        if is_loopback(address):
            self.probes[client.id] = self.clock()
            return
        vm = await self.identify(address)
        if vm is None:
            self._refuse_at_accept(client, ("unknown", address), f"connection from unknown address {address}")
            return
        if client.timestamp_end is not None:  # gone while we looked it up
            client.error = "closed"
            return
        over = self.counts.admit(vm.vm_id, vm.user_id)
        if over is not None:
            which = {"vm": f"{vm.vm_id}", "owner": f"the owner of {vm.vm_id}", "total": "the node"}[over]
            limit = {"vm": self.counts.caps.per_vm, "owner": self.counts.caps.per_owner}.get(
                over, self.counts.caps.total
            )
            self._refuse_at_accept(
                client, (over, vm.vm_id), f"{which} has {limit} connections open: one more refused"
            )
            return
        self.conns[client.id] = Conn(vm, "tcp", opened=self.clock())

    def _refuse_at_accept(self, client: Client, key: tuple[str, str], message: str) -> None:
        client.error = "refused"
        self.refused += 1
        held = self._throttle.due(key)
        if held is not None:
            log.warning("%s%s", message, held_note(held))

    def client_disconnected(self, client: Client) -> None:
        self.probes.pop(client.id, None)
        conn = self.conns.pop(client.id, None)
        if conn is not None:
            counted = conn.traffic.settle()
            if counted is not None:
                self.audit(counted)
            self.counts.release(conn.vm.vm_id, conn.vm.user_id)

    def undecided_expired(self) -> list[str]:
        """Client ids of connections (and probes) still undecided after the first-byte timeout: the caller
        closes them."""
        limit = self.clock() - self.first_byte_timeout
        out = [cid for cid, conn in self.conns.items() if not conn.decided and conn.opened <= limit]
        out += [cid for cid, opened in self.probes.items() if opened <= limit]
        return out

    def _record(
        self,
        vm: VmEntry,
        protocol: str,
        decision: Decision,
        host: str | None,
        address: str | None,
        conn: Conn | None = None,
    ) -> None:
        """Audit a decision. On a connection (``conn``), the event before it is sent again with its bytes,
        and an allowed one stays open for the bytes that follow."""
        if host is not None and is_ip_literal(host):  # an address given as a name is recorded as one
            address = host.strip("[]")
            host = None
        event = audit_event(vm, protocol, decision, host, address, self.now())
        if conn is not None:
            counted = conn.traffic.settle()
            if counted is not None:
                self.audit(counted)
            if decision.allowed:
                event = replace(event, id=new_id(Prefix.EGRESS_EVENT))
                conn.traffic.event = event
        self.audit(event)

    async def _address_of(self, name: str) -> str | None:
        """The address the proxy connects to for ``name``: its own resolution, never a platform address."""
        if is_ip_literal(name):
            address = name.strip("[]")
            return None if address in self.forbidden else address
        try:
            addresses = await self.resolver.resolve(name)
        except Exception as exc:  # UpstreamError, or a name the DNS codec refuses (label > 63, bad IDNA)
            if not isinstance(exc, UpstreamError):
                log.info("cannot resolve %r: %s", name[:300], exc)
            return None
        usable = [a for a in addresses if a not in self.forbidden]
        return usable[0] if usable else None

    # ---- connections ----------------------------------------------------------------------------------------

    async def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Decide a connection of a sandbox (the top layer only: inside a connection intercepted here,
        mitmproxy's own addon picks the protocol). Any failure refuses the connection: nothing passes
        undecided (``TopLevelOnly`` keeps mitmproxy's addon from deciding in our place)."""
        ctx = nextlayer.context
        if nextlayer.layer is not None or len(ctx.layers) != 1:
            return
        try:
            await self._decide(nextlayer)
        except Exception:
            log.exception("deciding a connection from %s failed: refused", ctx.client.peername[0])
            nextlayer.layer = _Refuse(ctx)
        conn = self.conns.get(ctx.client.id)
        if conn is not None and nextlayer.layer is not None:
            conn.decided = True

    def _probe(self, nextlayer: layer.NextLayer) -> None:
        """The supervisor's probe: answered with the process's health line once its request is complete."""
        data: bytes = nextlayer.data_client()  # type: ignore[no-untyped-call]
        if data == PROBE_REQUEST:
            nextlayer.layer = _Reply(nextlayer.context, f"corral-egress {self.health()}\n".encode())
        elif not PROBE_REQUEST.startswith(data):
            nextlayer.layer = _Refuse(nextlayer.context)

    async def _decide(self, nextlayer: layer.NextLayer) -> None:
        ctx = nextlayer.context
        if ctx.client.id in self.probes:
            self._probe(nextlayer)
            return
        conn = self.conns.get(ctx.client.id)
        if conn is None:  # refused at accept (or gone): nothing passes
            nextlayer.layer = _Refuse(ctx)
            return
        vm = conn.vm
        assert ctx.server.address is not None
        dst, port = str(ctx.server.address[0]), int(ctx.server.address[1])
        conn.port = port
        if dst in self.forbidden:
            self._record(vm, "tcp", Decision("denied", False, vm.policy.mode), None, dst)
            nextlayer.layer = _Refuse(ctx)
            return
        data: bytes = nextlayer.data_client()  # type: ignore[no-untyped-call]
        if not data:
            return  # wait for the client to speak (a server-first protocol waits: see docs/security.md)
        if len(data) > MAX_UNDECIDED:
            self._record(vm, "tcp", Decision("denied", False, vm.policy.mode), None, dst)
            nextlayer.layer = _Refuse(ctx)
            return
        if starts_like_tls_record(data):
            try:
                hello = parse_client_hello(data)
            except ValueError:
                hello = None
            else:
                if hello is None:
                    return  # the ClientHello is not complete yet
            if hello is not None and hello.sni:
                await self._tls(nextlayer, conn, normalise_host(hello.sni), port)
                return
            self._raw(nextlayer, conn, "tls", dst, port)
            return
        if _HTTP_START.match(data):
            conn.protocol = "http"
            nextlayer.layer = count_bytes(layers.HttpLayer(ctx, HTTPMode.transparent), conn.traffic)
            return
        if len(data) < MAX_REQUEST_LINE and _HTTP_PREFIX.match(data):
            return  # perhaps a request line not complete yet: wait for the rest
        self._raw(nextlayer, conn, "tcp", dst, port)

    async def _tls(self, nextlayer: layer.NextLayer, conn: Conn, sni: str, port: int) -> None:
        ctx, vm = nextlayer.context, conn.vm
        conn.protocol, conn.sni = "tls", sni
        decision = vm.policy.decide(host=sni, address=sni if is_ip_literal(sni) else None)
        address = await self._address_of(sni) if decision.allowed else None
        if decision.allowed and address is None:
            decision = Decision(decision.verdict, False, decision.mode)  # unresolvable, or a platform address
        self._record(vm, "tls", decision, sni, None, conn)
        if not decision.allowed:
            nextlayer.layer = _Refuse(ctx)
            return
        assert address is not None
        ctx.server.address = (address, port)
        ctx.server.sni = sni
        if decision.verdict == "allowed" and Injector.for_host(vm.secrets, sni):
            conn.intercepted = True
            server_tls = layers.ServerTLSLayer(ctx)
            server_tls.child_layer = layers.ClientTLSLayer(ctx)
            nextlayer.layer = count_bytes(server_tls, conn.traffic)
        else:
            nextlayer.layer = count_bytes(layers.TCPLayer(ctx, ignore=True), conn.traffic)

    def _raw(self, nextlayer: layer.NextLayer, conn: Conn, protocol: str, dst: str, port: int) -> None:
        ctx, vm = nextlayer.context, conn.vm
        conn.protocol = protocol
        name = self.memory.name_for(vm.vm_id, dst)
        decision = vm.policy.decide(host=name, address=dst)
        self._record(vm, protocol, decision, name, dst, conn)
        nextlayer.layer = (
            count_bytes(layers.TCPLayer(ctx, ignore=True), conn.traffic) if decision.allowed else _Refuse(ctx)
        )

    # ---- HTTP requests ----------------------------------------------------------------------------------------

    def _refuse_request(self, flow: http.HTTPFlow, status: int) -> None:
        if flow.request.stream:  # a large body already streaming: a response cannot be set any more
            flow.kill()  # type: ignore[no-untyped-call]
            return
        flow.response = http.Response.make(status, BLOCKED_BODY, {"Content-Type": "text/plain"})

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Decide one HTTP request (plain, or inside TLS intercepted here) with the VM's policy and secrets
        as they are now. Any failure refuses the request."""
        try:
            await self._request(flow)
        except Exception:
            log.exception("deciding a request failed: refused")
            self._refuse_request(flow, 403)

    async def _request(self, flow: http.HTTPFlow) -> None:
        conn = self.conns.get(flow.client_conn.id)
        vm = await self.identify(flow.client_conn.peername[0]) if conn is not None else None
        if conn is None or vm is None or vm.vm_id != conn.vm.vm_id:
            self._refuse_request(flow, 403)
            return
        header = flow.request.host_header
        name = split_host_port(header) if header else None
        authority = flow.request.authority
        if flow.request.method.upper() == "CONNECT" or (
            authority and name is not None and split_host_port(authority) != name
        ):
            # a tunnel request, or a request line naming another host than its Host header: never forwarded
            self._record(vm, "http", Decision("denied", False, vm.policy.mode), name, None, conn)
            self._refuse_request(flow, 403)
            return
        if conn.intercepted:
            # inside TLS the proxy terminated for this name: any other Host is refused
            decision = vm.policy.decide(host=conn.sni)
            if name != conn.sni:
                decision = Decision("denied", False, decision.mode)
            self._record(vm, "http", decision, name or conn.sni, None, conn)
            if not decision.allowed:
                self._refuse_request(flow, 421)
                return
            if decision.verdict == "allowed":
                injector = Injector.for_host(vm.secrets, conn.sni or "")
                current: list[tuple[str, str]] = list(flow.request.headers.items(multi=True))  # type: ignore[no-untyped-call]
                fields, used = injector.headers(current)
                if used:
                    flow.request.headers.clear()
                    for key, value in fields:
                        flow.request.headers.add(key, value)
            return
        if name is None:  # no Host (HTTP/1.0): the destination address decides
            dst = flow.request.host
            decision = vm.policy.decide(address=dst)
            if dst in self.forbidden:
                decision = Decision(decision.verdict, False, decision.mode)
            self._record(vm, "http", decision, None, dst, conn)
            if not decision.allowed:
                self._refuse_request(flow, 403)
            return
        decision = vm.policy.decide(host=name, address=name if is_ip_literal(name) else None)
        address = await self._address_of(name) if decision.allowed else None
        if decision.allowed and address is None:
            decision = Decision(decision.verdict, False, decision.mode)
        self._record(vm, "http", decision, name, None, conn)
        if not decision.allowed or address is None:
            self._refuse_request(flow, 403)
            return
        # connect to the name's address, on the port the sandbox asked for; the Host header stays as sent
        assert header is not None
        flow.request.host = address
        flow.request.host_header = header

    # ---- upgraded connections -----------------------------------------------------------------------------

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """mitmproxy keeps every message of a flow; a long-lived WebSocket would grow without end."""
        if flow.websocket is not None:
            del flow.websocket.messages[:-1]

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        del flow.messages[:-1]
