"""The sandboxes' resolver without a socket: ``DnsService.answer`` against a fake upstream (which records
every packet it is sent) and a fake client index; the ``Resolver``'s cache and shared lookups."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import dnslib  # type: ignore[import-untyped, unused-ignore]  # dnslib ships no types
import pytest
from dnslib import QTYPE, RCODE, RR, DNSRecord

from corral.domain.egress_policy import ENFORCE, WARN, Decision, Policy, Rule
from corral.egress.dns import (
    ANSWER_TTL,
    MAX_TTL,
    MIN_TTL,
    NEGATIVE_TTL,
    DnsService,
    Lookup,
    NameMemory,
    Resolver,
    Upstream,
    UpstreamError,
)
from corral.egress.state import VmEntry

ALLOWED = "api.example.org"
DENIED = "exfil.evil.net"
CLIENT = "10.88.0.5"
OTHER_CLIENT = "10.88.0.6"


def run[T](coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeUpstream(Upstream):
    """Answers from a table: name -> A addresses (missing: NXDOMAIN); other types get a TXT record, plus an A,
    an AAAA and an additional record the service must strip. ``gate`` holds every answer until set."""

    def __init__(self, records: dict[str, list[str]] | None = None, ttl: int = 60) -> None:
        super().__init__(servers=())
        self.records = records if records is not None else {ALLOWED: ["93.184.216.34", "93.184.216.35"]}
        self.ttl = ttl
        self.packets: list[DNSRecord] = []
        self.fail = False
        self.gate: asyncio.Event | None = None
        self.reply_id = 4242  # a different id than the query's: the service must put the client's back

    @property
    def names(self) -> list[str]:
        return [str(q.qname).rstrip(".").lower() for p in self.packets for q in p.questions]

    async def exchange(self, packet: bytes) -> bytes:
        query = DNSRecord.parse(packet)
        self.packets.append(query)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise UpstreamError("no upstream name server answered")
        reply = query.reply()
        reply.header.id = self.reply_id
        qname = query.q.qname
        name = str(qname).rstrip(".").lower()
        if name not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
            return bytes(reply.pack())
        if query.q.qtype == QTYPE.A:
            for address in self.records[name]:
                reply.add_answer(RR(qname, QTYPE.A, rdata=dnslib.A(address), ttl=self.ttl))
        else:
            reply.add_answer(RR(qname, QTYPE.TXT, rdata=dnslib.TXT("v=spf1 -all"), ttl=self.ttl))
            reply.add_answer(RR(qname, QTYPE.A, rdata=dnslib.A("6.6.6.6"), ttl=self.ttl))
            reply.add_answer(RR(qname, QTYPE.AAAA, rdata=dnslib.AAAA("2001:db8::6"), ttl=self.ttl))
            reply.add_ar(RR("ns.evil.net", QTYPE.A, rdata=dnslib.A("6.6.6.7"), ttl=self.ttl))
        return bytes(reply.pack())


def vm_entry(vm_id: str, mode: str = ENFORCE) -> VmEntry:
    return VmEntry(vm_id, "usr_1", Policy.build(mode, [Rule(host=ALLOWED), Rule(host="*.allowed.org")]), ())


class Setup:
    def __init__(self, mode: str = ENFORCE, upstream: FakeUpstream | None = None) -> None:
        self.clock = Clock()
        self.upstream = upstream or FakeUpstream()
        self.resolver = Resolver(self.upstream, clock=self.clock)
        self.memory = NameMemory(clock=self.clock)
        self.clients = {CLIENT: vm_entry("vm_a", mode), OTHER_CLIENT: vm_entry("vm_b", mode)}
        self.asked: list[str] = []
        self.denied: list[tuple[str, str, Decision]] = []

        async def identify(address: str) -> VmEntry | None:
            self.asked.append(address)
            return self.clients.get(address)

        def report(vm: VmEntry, name: str, decision: Decision) -> None:
            self.denied.append((vm.vm_id, name, decision))

        self.service = DnsService(self.resolver, self.memory, identify, report, clock=self.clock, quiet=5.0)

    def ask(self, name: str, qtype: str = "A", client: str = CLIENT, query_id: int = 777) -> DNSRecord:
        query = DNSRecord.question(name, qtype)
        query.header.id = query_id
        out = run(self.service.answer(bytes(query.pack()), client))
        assert out is not None
        reply = DNSRecord.parse(out)
        assert reply.header.id == query_id
        assert reply.header.qr == 1
        return reply


def addresses(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


# --- DnsService.answer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["A", "AAAA", "TXT"])
def test_unknown_client_is_refused(qtype: str) -> None:
    s = Setup()
    reply = s.ask(ALLOWED, qtype, client="10.88.0.99")
    assert reply.header.rcode == RCODE.REFUSED
    assert not reply.rr
    assert s.asked == ["10.88.0.99"]
    assert s.upstream.packets == []


@pytest.mark.parametrize("qtype", ["A", "AAAA", "TXT", "MX", "ANY"])
@pytest.mark.parametrize(
    "name", [DENIED, "evil.net", "a.b.allowed.org", "allowed.org", "api.example.org.evil.net"]
)
def test_enforce_denied_name_is_nxdomain_and_nothing_goes_upstream(qtype: str, name: str) -> None:
    s = Setup(ENFORCE)
    reply = s.ask(name, qtype)
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert not reply.rr
    assert s.upstream.packets == []
    assert s.denied == [("vm_a", name, Decision("denied", False, ENFORCE))]


def test_allowed_a_is_answered_with_the_upstreams_addresses_and_remembered_per_vm() -> None:
    s = Setup()
    reply = s.ask("API.Example.ORG.")
    assert reply.header.rcode == RCODE.NOERROR
    assert addresses(reply) == ["93.184.216.34", "93.184.216.35"]
    assert {rr.ttl for rr in reply.rr} == {ANSWER_TTL}
    assert str(reply.rr[0].rname) == "API.Example.ORG."  # the question's name, as asked
    assert s.upstream.names == [ALLOWED]
    assert s.memory.name_for("vm_a", "93.184.216.34") == ALLOWED
    assert s.memory.name_for("vm_a", "93.184.216.35") == ALLOWED
    assert s.memory.name_for("vm_b", "93.184.216.34") is None  # another VM did not ask
    assert s.memory.name_for("vm_a", "1.2.3.4") is None
    assert s.denied == []


def test_a_wildcard_allowed_name_resolves() -> None:
    s = Setup(upstream=FakeUpstream({"pkg.allowed.org": ["198.51.100.1"]}))
    assert addresses(s.ask("pkg.allowed.org")) == ["198.51.100.1"]


def test_remembered_names_expire_after_ttl_and_grace() -> None:
    s = Setup(upstream=FakeUpstream(ttl=60))
    s.ask(ALLOWED)
    s.clock.now += 60 + 300 - 1
    assert s.memory.name_for("vm_a", "93.184.216.34") == ALLOWED
    s.clock.now += 2
    assert s.memory.name_for("vm_a", "93.184.216.34") is None


def test_the_upstreams_nxdomain_is_passed_on_and_nothing_remembered() -> None:
    s = Setup(upstream=FakeUpstream({}))
    reply = s.ask(ALLOWED)
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert not reply.rr
    assert s.memory.name_for("vm_a", "93.184.216.34") is None


def test_a_name_without_a_records_is_nodata_not_nxdomain() -> None:
    s = Setup(upstream=FakeUpstream({ALLOWED: []}))
    reply = s.ask(ALLOWED)
    assert not reply.rr
    assert reply.header.rcode == RCODE.NOERROR


def test_aaaa_is_an_empty_noerror_without_asking_upstream() -> None:
    s = Setup()
    reply = s.ask(ALLOWED, "AAAA")
    assert reply.header.rcode == RCODE.NOERROR
    assert not reply.rr
    assert s.upstream.packets == []


@pytest.mark.parametrize("qtype", ["TXT", "MX", "CNAME", "ANY"])
def test_other_types_are_forwarded_for_allowed_names_without_addresses(qtype: str) -> None:
    s = Setup()
    reply = s.ask(ALLOWED, qtype, query_id=31337)
    assert reply.header.rcode == RCODE.NOERROR
    assert [QTYPE[rr.rtype] for rr in reply.rr] == ["TXT"]  # the A and AAAA records are gone
    assert not reply.ar
    assert s.upstream.names == [ALLOWED]
    assert QTYPE[s.upstream.packets[0].q.qtype] == qtype
    assert s.memory.name_for("vm_a", "6.6.6.6") is None


@pytest.mark.parametrize("qtype", ["A", "TXT"])
def test_upstream_failure_is_servfail(qtype: str) -> None:
    upstream = FakeUpstream()
    upstream.fail = True
    s = Setup(upstream=upstream)
    reply = s.ask(ALLOWED, qtype)
    assert reply.header.rcode == RCODE.SERVFAIL
    assert not reply.rr


@pytest.mark.parametrize(
    "packet",
    [b"", b"\x00", b"\x12\x34", b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n", bytes(range(256))],
)
def test_garbage_gets_no_answer(packet: bytes) -> None:
    s = Setup()
    assert run(s.service.answer(packet, CLIENT)) is None
    assert s.upstream.packets == []


def test_a_query_without_question_is_formerr() -> None:
    s = Setup()
    empty = DNSRecord()
    empty.header.id = 9
    out = run(s.service.answer(bytes(empty.pack()), CLIENT))
    assert out is not None
    assert DNSRecord.parse(out).header.rcode == RCODE.FORMERR
    assert s.asked == []


def test_a_response_sent_as_a_query_is_formerr() -> None:
    s = Setup()
    reply = DNSRecord.question(ALLOWED).reply()
    out = run(s.service.answer(bytes(reply.pack()), CLIENT))
    assert out is not None
    assert DNSRecord.parse(out).header.rcode == RCODE.FORMERR
    assert s.upstream.packets == []


@pytest.mark.parametrize(("qtype", "forwarded"), [("A", True), ("TXT", True), ("AAAA", False)])
def test_warn_mode_resolves_denied_names_and_reports_them(qtype: str, forwarded: bool) -> None:
    s = Setup(WARN, upstream=FakeUpstream({DENIED: ["203.0.113.66"]}))
    reply = s.ask(DENIED, qtype)
    assert reply.header.rcode == RCODE.NOERROR
    assert s.upstream.names == ([DENIED] if forwarded else [])
    if qtype == "A":
        assert addresses(reply) == ["203.0.113.66"]
        assert s.memory.name_for("vm_a", "203.0.113.66") == DENIED
    assert s.denied == [("vm_a", DENIED, Decision("denied", True, WARN))]


def test_warn_mode_reports_no_allowed_name() -> None:
    s = Setup(WARN)
    s.ask(ALLOWED)
    assert s.denied == []


def test_denied_lookups_are_reported_once_per_vm_and_name_per_quiet_period() -> None:
    s = Setup()
    s.ask(DENIED)
    s.ask(DENIED, "AAAA")
    s.ask(DENIED, client=OTHER_CLIENT)
    s.ask("other.evil.net")
    s.clock.now += 4.9
    s.ask(DENIED)
    assert [(vm, name) for vm, name, _ in s.denied] == [
        ("vm_a", DENIED),
        ("vm_b", DENIED),
        ("vm_a", "other.evil.net"),
    ]
    s.clock.now += 0.2
    s.ask(DENIED)
    assert [(vm, name) for vm, name, _ in s.denied][-1] == ("vm_a", DENIED)
    assert len(s.denied) == 4


def test_no_report_callback_is_fine() -> None:
    async def identify(address: str) -> VmEntry | None:
        return vm_entry("vm_a")

    service = DnsService(Resolver(FakeUpstream()), NameMemory(), identify)
    out = run(service.answer(bytes(DNSRecord.question(DENIED).pack()), CLIENT))
    assert out is not None
    assert DNSRecord.parse(out).header.rcode == RCODE.NXDOMAIN


def test_only_the_checked_question_goes_upstream() -> None:
    """A forwarded query carries the one question the policy checked, nothing else of the sandbox's packet:
    not a second question, not an additional record (both could name a denied host)."""
    s = Setup(ENFORCE, upstream=FakeUpstream({ALLOWED: [], DENIED: []}))
    query = DNSRecord.question(ALLOWED, "TXT")
    query.header.id = 555
    query.add_question(dnslib.DNSQuestion(f"secret-data.{DENIED}", QTYPE.TXT))
    query.add_ar(RR(f"more-data.{DENIED}", QTYPE.TXT, rdata=dnslib.TXT("payload")))
    out = run(s.service.answer(bytes(query.pack()), CLIENT))
    assert out is not None
    assert DNSRecord.parse(out).header.id == 555
    assert s.upstream.names == [ALLOWED]
    sent = s.upstream.packets[0]
    assert not any(str(rr.rname).rstrip(".").endswith(DENIED) for rr in sent.ar), sent.ar


# --- NameMemory -----------------------------------------------------------------------------------------


def test_name_memory_forget_keeps_only_live_vms() -> None:
    clock = Clock()
    memory = NameMemory(clock=clock, grace=0)
    memory.remember("vm_a", "a.example.org", ["192.0.2.1"], 10)
    memory.remember("vm_b", "b.example.org", ["192.0.2.1"], 10)
    assert memory.name_for("vm_a", "192.0.2.1") == "a.example.org"
    assert memory.name_for("vm_b", "192.0.2.1") == "b.example.org"
    memory.forget({"vm_b"})
    assert memory.name_for("vm_a", "192.0.2.1") is None
    assert memory.name_for("vm_b", "192.0.2.1") == "b.example.org"


def test_name_memory_the_latest_answer_wins() -> None:
    memory = NameMemory(clock=Clock())
    memory.remember("vm_a", "old.example.org", ["192.0.2.1"], 10)
    memory.remember("vm_a", "new.example.org", ["192.0.2.1"], 10)
    assert memory.name_for("vm_a", "192.0.2.1") == "new.example.org"


# --- Resolver -------------------------------------------------------------------------------------------


def resolver(upstream: FakeUpstream | None = None) -> tuple[Resolver, FakeUpstream, Clock]:
    clock = Clock()
    up = upstream or FakeUpstream()
    return Resolver(up, clock=clock), up, clock


def test_lookup_is_cached_within_its_ttl() -> None:
    r, up, clock = resolver(FakeUpstream(ttl=60))

    async def go() -> list[Lookup]:
        first = await r.lookup(ALLOWED)
        clock.now += 59
        second = await r.lookup("API.example.org.")  # the same name
        clock.now += 2
        third = await r.lookup(ALLOWED)
        return [first, second, third]

    first, second, third = run(go())
    assert first == second == third == Lookup(RCODE.NOERROR, ("93.184.216.34", "93.184.216.35"), 60)
    assert len(up.packets) == 2
    assert up.packets[0].q.qtype == QTYPE.A


@pytest.mark.parametrize(("ttl", "kept"), [(0, MIN_TTL), (1, MIN_TTL), (120, 120), (86400, MAX_TTL)])
def test_ttl_is_bounded(ttl: int, kept: int) -> None:
    r, up, clock = resolver(FakeUpstream(ttl=ttl))

    async def go() -> None:
        assert (await r.lookup(ALLOWED)).ttl == kept
        clock.now += kept - 0.5
        await r.lookup(ALLOWED)
        assert len(up.packets) == 1
        clock.now += 1
        await r.lookup(ALLOWED)
        assert len(up.packets) == 2

    run(go())


def test_negative_answers_are_cached_briefly() -> None:
    r, up, clock = resolver(FakeUpstream({}))

    async def go() -> None:
        found = await r.lookup(DENIED)
        assert (found.rcode, found.addresses) == (RCODE.NXDOMAIN, ())
        clock.now += NEGATIVE_TTL - 0.5
        assert await r.resolve(DENIED) == []
        assert len(up.packets) == 1
        clock.now += 1
        await r.lookup(DENIED)
        assert len(up.packets) == 2

    run(go())


def test_concurrent_lookups_of_one_name_share_one_query() -> None:
    r, up, _ = resolver()

    async def go() -> list[list[str]]:
        up.gate = asyncio.Event()
        tasks = [asyncio.ensure_future(r.resolve(n)) for n in (ALLOWED, ALLOWED.upper(), ALLOWED + ".")]
        await asyncio.sleep(0.01)
        assert len(up.packets) == 1
        up.gate.set()
        return list(await asyncio.gather(*tasks))

    results = run(go())
    assert results == [["93.184.216.34", "93.184.216.35"]] * 3
    assert len(up.packets) == 1


def test_concurrent_lookups_of_different_names_do_not_wait_for_each_other() -> None:
    r, up, _ = resolver(FakeUpstream({"a.example.org": ["192.0.2.1"], "b.example.org": ["192.0.2.2"]}))

    async def go() -> list[list[str]]:
        return list(await asyncio.gather(r.resolve("a.example.org"), r.resolve("b.example.org")))

    assert run(go()) == [["192.0.2.1"], ["192.0.2.2"]]
    assert len(up.packets) == 2


def test_a_failure_reaches_every_waiter_and_is_not_cached() -> None:
    r, up, _ = resolver()

    async def go() -> list[BaseException | list[str]]:
        up.gate = asyncio.Event()
        up.fail = True
        tasks = [asyncio.ensure_future(r.resolve(ALLOWED)) for _ in range(3)]
        await asyncio.sleep(0.01)
        up.gate.set()
        outcome: list[BaseException | list[str]] = list(await asyncio.gather(*tasks, return_exceptions=True))
        up.fail = False
        outcome.append(await r.resolve(ALLOWED))
        return outcome

    *failures, after = run(go())
    assert all(isinstance(f, UpstreamError) for f in failures)
    assert after == ["93.184.216.34", "93.184.216.35"]
    assert len(up.packets) == 2


def test_cancelling_one_lookup_does_not_cancel_the_others() -> None:
    r, up, _ = resolver()

    async def go() -> list[str]:
        up.gate = asyncio.Event()
        first = asyncio.ensure_future(r.resolve(ALLOWED))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(r.resolve(ALLOWED))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0.01)
        up.gate.set()
        return await asyncio.wait_for(second, 5)

    assert run(go()) == ["93.184.216.34", "93.184.216.35"]


def test_upstream_without_servers_fails() -> None:
    with pytest.raises(UpstreamError, match="no upstream name server is configured"):
        run(Upstream(()).exchange(bytes(DNSRecord.question(ALLOWED).pack())))
