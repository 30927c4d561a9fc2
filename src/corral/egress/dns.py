"""The resolver sandboxes use (every DNS packet they send, to any address, is redirected here) and the one
the proxy connects by. Names the sandbox's policy allows are resolved upstream; in enforce mode every other
name is answered NXDOMAIN here, without a packet upstream (no exfiltration through DNS). The addresses a
sandbox was given are remembered, so a raw TCP connection to one is matched by its name."""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord

from corral.domain.egress_policy import Decision, normalise_host
from corral.egress.state import VmEntry

log = logging.getLogger(__name__)

MIN_TTL, MAX_TTL, NEGATIVE_TTL = 5, 300, 10
ANSWER_TTL = 30


class UpstreamError(Exception):
    pass


@dataclass
class Upstream:
    """Queries to the upstream name servers (UDP, TCP when the answer is truncated)."""

    servers: tuple[str, ...]
    timeout: float = 2.0

    async def exchange(self, packet: bytes) -> bytes:
        if not self.servers:
            raise UpstreamError("no upstream name server is configured")
        last: Exception | None = None
        for server in self.servers:
            try:
                reply = await self._udp(server, packet)
                if DNSRecord.parse(reply).header.tc:
                    reply = await self._tcp(server, packet)
                return reply
            except Exception as exc:
                last = exc
        raise UpstreamError(f"no upstream name server answered: {last}")

    async def _udp(self, server: str, packet: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        query_id = packet[:2]

        class _Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                if data[:2] == query_id and not fut.done():
                    fut.set_result(data)

            def error_received(self, exc: Exception) -> None:
                if not fut.done():
                    fut.set_exception(exc)

        transport, _ = await loop.create_datagram_endpoint(_Proto, remote_addr=(server, 53))
        try:
            transport.sendto(packet)
            return await asyncio.wait_for(fut, self.timeout)
        finally:
            transport.close()

    async def _tcp(self, server: str, packet: bytes) -> bytes:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(server, 53), self.timeout)
        try:
            writer.write(struct.pack("!H", len(packet)) + packet)
            await writer.drain()
            (size,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), self.timeout))
            return await asyncio.wait_for(reader.readexactly(size), self.timeout)
        finally:
            writer.close()


@dataclass(frozen=True)
class Lookup:
    rcode: int
    addresses: tuple[str, ...]
    ttl: int


class Resolver:
    """A records of names, through the upstream servers, cached for their TTL (bounded)."""

    def __init__(self, upstream: Upstream, clock: Callable[[], float] = time.monotonic) -> None:
        self.upstream = upstream
        self._clock = clock
        self._cache: dict[str, tuple[float, Lookup]] = {}
        self._inflight: dict[str, asyncio.Future[Lookup]] = {}

    async def lookup(self, name: str) -> Lookup:
        name = normalise_host(name)
        hit = self._cache.get(name)
        if hit is not None and hit[0] > self._clock():
            return hit[1]
        task = self._inflight.get(name)
        if (
            task is None
        ):  # one query upstream for everyone asking now; a waiter that gives up cancels only itself
            task = asyncio.ensure_future(self._fetch(name))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if all gave up
            self._inflight[name] = task
        return await asyncio.shield(task)

    async def _fetch(self, name: str) -> Lookup:
        try:
            result = await self._query(name)
        finally:
            self._inflight.pop(name, None)
        ttl = result.ttl if result.addresses else NEGATIVE_TTL
        if len(self._cache) > 50_000:
            self._cache.clear()
        self._cache[name] = (self._clock() + ttl, result)
        return result

    async def resolve(self, name: str) -> list[str]:
        return list((await self.lookup(name)).addresses)

    async def _query(self, name: str) -> Lookup:
        """One A query upstream (raises UpstreamError when no server answers)."""
        query = DNSRecord.question(name, "A")
        query.header.id = random.randint(0, 0xFFFF)  # noqa: S311 -- a query id, not a secret
        reply = DNSRecord.parse(await self.upstream.exchange(query.pack()))
        addresses = tuple(str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A)
        ttls = [rr.ttl for rr in reply.rr if rr.rtype == QTYPE.A]
        ttl = max(MIN_TTL, min([MAX_TTL, *ttls]))
        return Lookup(reply.header.rcode, addresses, ttl)


class NameMemory:
    """Per VM: the names it was given addresses for, by address, until the answer's TTL ran out."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, grace: float = 300.0) -> None:
        self._clock = clock
        self._grace = grace  # connections often come a little after the TTL: keep the name a while longer
        self._names: dict[str, dict[str, tuple[float, str]]] = {}

    def remember(self, vm_id: str, name: str, addresses: list[str], ttl: int) -> None:
        table = self._names.setdefault(vm_id, {})
        if len(table) > 10_000:
            table.clear()
        until = self._clock() + ttl + self._grace
        for address in addresses:
            table[address] = (until, name)

    def name_for(self, vm_id: str, address: str) -> str | None:
        hit = self._names.get(vm_id, {}).get(address)
        if hit is None or hit[0] < self._clock():
            return None
        return hit[1]

    def forget(self, keep: set[str]) -> None:
        for vm_id in list(self._names):
            if vm_id not in keep:
                del self._names[vm_id]


class DnsService:
    """Answers one query from a sandbox: ``identify`` maps the client address to its VM. A lookup of a name
    the policy does not allow is reported to ``denied`` (once per VM and name every ``quiet`` seconds:
    resolvers repeat a query, for A and AAAA, and retry)."""

    def __init__(
        self,
        resolver: Resolver,
        memory: NameMemory,
        identify: Callable[[str], Awaitable[VmEntry | None]],
        denied: Callable[[VmEntry, str, Decision], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        quiet: float = 5.0,
    ) -> None:
        self.resolver = resolver
        self.memory = memory
        self.identify = identify
        self.denied = denied
        self._clock = clock
        self._quiet = quiet
        self._reported: dict[tuple[str, str], float] = {}

    def _report(self, vm: VmEntry, name: str, decision: Decision) -> None:
        if self.denied is None:
            return
        now = self._clock()
        key = (vm.vm_id, name)
        if self._reported.get(key, -1e18) + self._quiet > now:
            return
        if len(self._reported) > 100_000:
            self._reported.clear()
        self._reported[key] = now
        self.denied(vm, name, decision)

    async def answer(self, packet: bytes, client: str) -> bytes | None:
        try:
            request = DNSRecord.parse(packet)
        except Exception:
            return None  # not DNS: no answer
        reply = request.reply()
        if not request.questions or request.header.qr:
            reply.header.rcode = RCODE.FORMERR
            return bytes(reply.pack())
        question = request.questions[0]
        name = normalise_host(str(question.qname))
        vm = await self.identify(client)
        if vm is None:
            reply.header.rcode = RCODE.REFUSED
            return bytes(reply.pack())
        decision = vm.policy.decide(host=name)
        if decision.verdict == "denied":
            self._report(vm, name, decision)
        if not decision.allowed:
            reply.header.rcode = RCODE.NXDOMAIN
            return bytes(reply.pack())
        qtype = question.qtype
        try:
            if qtype == QTYPE.A:
                found = await self.resolver.lookup(name)
                if found.addresses:
                    self.memory.remember(vm.vm_id, name, list(found.addresses), found.ttl)
                    for address in found.addresses:
                        reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=ANSWER_TTL))
                else:
                    reply.header.rcode = found.rcode  # NXDOMAIN, or NOERROR with no address (NODATA)
            elif qtype == QTYPE.AAAA:
                pass  # no IPv6 leaves the gateway: an empty answer makes clients use IPv4 at once
            else:
                # only the one question goes upstream, as a query of ours (nothing else of the packet)
                query = DNSRecord(DNSHeader(id=request.header.id, rd=1), q=DNSQuestion(name, qtype))
                upstream = DNSRecord.parse(await self.resolver.upstream.exchange(query.pack()))
                upstream.header.id = request.header.id
                # addresses only through the A path above (remembered, filtered): drop any in this answer
                upstream.rr = [rr for rr in upstream.rr if rr.rtype not in (QTYPE.A, QTYPE.AAAA)]
                upstream.ar = []
                return bytes(upstream.pack())
        except UpstreamError as exc:
            log.warning("resolving %s for %s failed: %s", name, vm.vm_id, exc)
            reply.header.rcode = RCODE.SERVFAIL
        return bytes(reply.pack())


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, service: DnsService) -> None:
        self.service = service
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.ensure_future(self._reply(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            out = await self.service.answer(data, addr[0])
            if out is not None:
                out = fit_udp(data, out)
        except Exception:
            log.exception("DNS query from %s failed", addr[0])
            return
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


def fit_udp(query: bytes, reply: bytes) -> bytes:
    """A UDP answer no larger than the client said it takes (512 bytes without EDNS, at most 4096):
    when too large, an empty answer with TC set, so the client asks again over TCP."""
    limit = 512
    try:
        for rr in DNSRecord.parse(query).ar:
            if rr.rtype == QTYPE.OPT:
                limit = min(max(512, int(rr.rclass)), 4096)
    except Exception:
        limit = 512
    if len(reply) <= limit:
        return reply
    cut = DNSRecord.parse(reply)
    cut.rr, cut.auth, cut.ar = [], [], []
    cut.header.tc = 1
    return bytes(cut.pack())


MAX_TCP_PER_CLIENT = 16  # DNS over TCP connections one sandbox address may hold open at once
MAX_TCP = 1024  # and all sandboxes together (each holds a descriptor of the egress process)


async def serve(
    service: DnsService,
    host: str,
    port: int,
    *,
    max_tcp_per_client: int = MAX_TCP_PER_CLIENT,
    max_tcp: int = MAX_TCP,
    idle: float = 30.0,
) -> Callable[[], None]:
    """Listen on UDP and TCP; returns a function that stops both. TCP connections are capped per client
    address and in all (one over a cap is closed at once) and closed after ``idle`` seconds without a query."""
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(lambda: _UdpServer(service), local_addr=(host, port))
    open_by_client: dict[str, int] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0])
        if open_by_client.get(client, 0) >= max_tcp_per_client or sum(open_by_client.values()) >= max_tcp:
            writer.close()
            return
        open_by_client[client] = open_by_client.get(client, 0) + 1
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), idle)
                (size,) = struct.unpack("!H", head)
                packet = await asyncio.wait_for(reader.readexactly(size), idle)
                out = await service.answer(packet, client)
                if out is None:
                    return
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            left = open_by_client.get(client, 1) - 1
            if left > 0:
                open_by_client[client] = left
            else:
                open_by_client.pop(client, None)
            writer.close()

    tcp = await asyncio.start_server(handle, host, port)

    def stop() -> None:
        udp.close()
        tcp.close()

    return stop
