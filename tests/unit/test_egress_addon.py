"""The addon's decisions on mitmproxy's own objects, without sockets: which layer a connection gets from its
first bytes, where it is sent, what is audited, and what each HTTP request becomes."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime

import pytest
from mitmproxy import http
from mitmproxy.options import Options
from mitmproxy.proxy import events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.test.tflow import tclient_conn, tflow

from corral.domain.egress_policy import ENFORCE, WARN, Forbidden, Policy, Rule
from corral.egress.addon import PROBE_REQUEST, EgressAddon, _Refuse, _Reply
from corral.egress.dns import NameMemory, Resolver, Upstream
from corral.egress.inject import SecretEntry
from corral.egress.limits import Caps
from corral.egress.state import VmEntry
from corral.services.audit import NewEvent

SANDBOX = "10.88.0.1"
SIBLING = "10.88.0.2"
NAMES = {
    "allowed.test": ["198.18.1.1"],
    "other.test": ["198.18.1.2"],
    "api.secret.test": ["198.18.1.3"],
    "a.wild.test": ["198.18.1.5"],
    "rebind.test": ["10.88.0.9"],  # an allowed name pointing at another sandbox
}
RULES = [
    Rule(host="allowed.test"),
    Rule(host="*.wild.test"),
    Rule(host="api.secret.test"),
    Rule(host="rebind.test"),
]
RULES += [Rule(cidr="198.18.2.0/24")]
SECRET = SecretEntry("tok", "CORRAL_PROXY_tok", "real-value", ("api.secret.test",))


class FakeResolver(Resolver):
    def __init__(self) -> None:
        super().__init__(Upstream(()))

    async def resolve(self, name: str) -> list[str]:
        return list(NAMES.get(name.lower().rstrip("."), []))


def vm(mode: str = ENFORCE) -> VmEntry:
    return VmEntry("vm_1", "usr_1", Policy.build(mode, RULES), (SECRET,))


class Harness:
    def __init__(self, mode: str = ENFORCE, max_per_vm: int = 1024, caps: Caps | None = None) -> None:
        self.events: list[NewEvent] = []
        self.memory = NameMemory()
        self.time = 1000.0
        entry = vm(mode)
        sibling = VmEntry("vm_2", "usr_1", entry.policy, ())  # another VM of the same owner

        async def identify(address: str) -> VmEntry | None:
            return {SANDBOX: entry, SIBLING: sibling}.get(address)

        self.addon = EgressAddon(
            identify=identify,
            resolver=FakeResolver(),
            memory=self.memory,
            forbidden=Forbidden.of("10.88.0.0/16", "100.127.88.0/30"),
            audit=self.events.append,
            now=lambda: datetime(2026, 1, 1, tzinfo=UTC),
            max_per_vm=max_per_vm,
            caps=caps,
            first_byte_timeout=30.0,
            health=lambda: "ok policy_age=0.2",
            clock=lambda: self.time,
        )

    def connect(
        self, data: bytes, dst: tuple[str, int] = ("198.18.1.1", 443), peer: str = SANDBOX
    ) -> tuple[layer.NextLayer, Context]:
        client = tclient_conn()
        client.peername = (peer, 40000)
        client.timestamp_end = None  # open
        ctx = Context(client, Options())
        ctx.server.address = dst
        layers.modes.TransparentProxy(ctx)
        nl = layer.NextLayer(ctx)
        if data:
            nl.events.append(events.DataReceived(client, data))

        async def accept_then_decide() -> None:
            await self.addon.client_connected(client)  # a refused one (client.error) never gets further
            await self.addon.next_layer(nl)

        asyncio.run(accept_then_decide())
        return nl, ctx


def client_hello(sni: str) -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_tls_to_an_allowed_name_passes_through_to_the_names_own_address() -> None:
    h = Harness()
    nl, ctx = h.connect(client_hello("allowed.test"), dst=("198.18.1.4", 443))  # the sandbox chose evil's IP
    assert isinstance(nl.layer, layers.TCPLayer)
    assert nl.layer.flow is None
    assert ctx.server.address == ("198.18.1.1", 443)
    assert ctx.server.sni == "allowed.test"
    assert [(e.protocol, e.host, e.verdict, e.allowed) for e in h.events] == [
        ("tls", "allowed.test", "allowed", True)
    ]


def test_tls_to_a_name_with_a_secret_is_intercepted() -> None:
    nl, ctx = Harness().connect(client_hello("api.secret.test"))
    assert isinstance(nl.layer, layers.ServerTLSLayer)
    assert ctx.server.address == ("198.18.1.3", 443)


@pytest.mark.parametrize("sni", ["other.test", "deep.a.wild.test", "rebind.test", "nowhere.test"])
def test_tls_refused_when_denied_unresolvable_or_a_platform_address(sni: str) -> None:
    h = Harness()
    nl, _ = h.connect(client_hello(sni))
    assert isinstance(nl.layer, _Refuse)
    assert h.events[-1].allowed is False


def test_warn_mode_lets_a_denied_name_through_and_says_so() -> None:
    h = Harness(WARN)
    nl, ctx = h.connect(client_hello("other.test"))
    assert isinstance(nl.layer, layers.TCPLayer)
    assert ctx.server.address == ("198.18.1.2", 443)
    assert (h.events[-1].verdict, h.events[-1].allowed, h.events[-1].mode) == ("denied", True, "warn")


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\n", b"get /x HTTP/1.1\r\n", b"M-SEARCH * HTTP/1.1\r\n", b"PRI * HTTP/2.0\r\n\r\n"],
)
def test_http_is_read_request_by_request(data: bytes) -> None:
    nl, _ = Harness().connect(data, dst=("198.18.1.1", 80))
    assert isinstance(nl.layer, layers.HttpLayer)


@pytest.mark.parametrize("data", [b"", b"GET /pa", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"])
def test_no_decision_before_enough_bytes(data: bytes) -> None:
    nl, _ = Harness().connect(data, dst=("198.18.1.1", 80))
    assert nl.layer is None


def test_raw_tcp_by_cidr_by_resolved_name_or_refused() -> None:
    h = Harness()
    nl, ctx = h.connect(b"hello\n", dst=("198.18.2.1", 7000))
    assert isinstance(nl.layer, layers.TCPLayer)
    assert ctx.server.address == ("198.18.2.1", 7000)
    assert (h.events[-1].protocol, h.events[-1].host, h.events[-1].cidr) == ("tcp", None, "198.18.2.1/32")
    nl, _ = h.connect(b"hello\n", dst=("198.18.1.5", 7000))
    assert isinstance(nl.layer, _Refuse)
    h.memory.remember("vm_1", "a.wild.test", ["198.18.1.5"], 30)  # the sandbox resolved it through Corral
    nl, _ = h.connect(b"hello\n", dst=("198.18.1.5", 7000))
    assert isinstance(nl.layer, layers.TCPLayer)
    assert h.events[-1].host == "a.wild.test"


@pytest.mark.parametrize(
    "dst", [("169.254.1.1", 15001), ("10.88.0.7", 80), ("100.127.88.1", 80), ("127.0.0.1", 80)]
)
def test_platform_addresses_are_refused_even_in_warn_mode(dst: tuple[str, int]) -> None:
    h = Harness(WARN)
    nl, _ = h.connect(b"GET / HTTP/1.1\r\n", dst=dst)
    assert isinstance(nl.layer, _Refuse)
    assert h.events[-1].allowed is False


def test_an_unknown_source_is_refused_without_audit() -> None:
    h = Harness()
    nl, _ = h.connect(client_hello("allowed.test"), peer="10.88.0.200")
    assert isinstance(nl.layer, _Refuse)
    assert h.events == []


def test_connections_per_vm_are_capped_and_freed() -> None:
    h = Harness(max_per_vm=2)
    first, _ = h.connect(client_hello("allowed.test"))
    h.connect(client_hello("allowed.test"))
    third, _ = h.connect(client_hello("allowed.test"))
    assert isinstance(third.layer, _Refuse)
    h.addon.client_disconnected(first.context.client)
    again, _ = h.connect(client_hello("allowed.test"))
    assert isinstance(again.layer, layers.TCPLayer)


def test_silent_connections_are_counted_at_accept_and_refused_beyond_the_cap() -> None:
    h = Harness(max_per_vm=2)
    silent = [h.connect(b"")[0] for _ in range(2)]
    assert all(nl.layer is None and nl.context.client.error is None for nl in silent)  # waiting, counted
    assert h.addon.open_per_vm == {"vm_1": 2}
    third, _ = h.connect(b"")
    assert third.context.client.error is not None  # closed at accept, before any byte
    assert isinstance(third.layer, _Refuse)
    assert h.events == []
    assert h.addon.refused == 1
    h.addon.client_disconnected(silent[0].context.client)
    assert h.addon.open_per_vm == {"vm_1": 1}
    assert h.connect(b"")[0].context.client.error is None


def test_an_owners_vms_share_the_owner_cap() -> None:
    h = Harness(caps=Caps(per_vm=3, per_owner=4, total=100))
    for _ in range(3):
        assert h.connect(b"")[0].context.client.error is None
    assert h.connect(b"", peer=SIBLING)[0].context.client.error is None
    refused, _ = h.connect(b"", peer=SIBLING)  # vm_2 holds 1 of its 3, but usr_1 holds 4 of 4
    assert refused.context.client.error is not None
    assert h.addon.counts.by_owner == {"usr_1": 4}


def test_undecided_connections_expire_after_the_first_byte_timeout() -> None:
    h = Harness()
    silent, _ = h.connect(b"")
    partial, _ = h.connect(b"GET /pa", dst=("198.18.1.1", 80))
    decided, _ = h.connect(client_hello("allowed.test"))
    h.time += 29.0
    assert h.addon.undecided_expired() == []
    h.time += 1.5
    assert sorted(h.addon.undecided_expired()) == sorted(
        [silent.context.client.id, partial.context.client.id]
    )
    assert decided.context.client.id not in h.addon.undecided_expired()


def test_the_supervisors_probe_from_loopback_is_answered_and_not_counted() -> None:
    h = Harness()
    waiting, _ = h.connect(PROBE_REQUEST[:5], peer="127.0.0.1")
    assert waiting.layer is None
    nl, _ = h.connect(PROBE_REQUEST, peer="127.0.0.1")
    assert isinstance(nl.layer, _Reply)
    assert nl.layer.reply == b"corral-egress ok policy_age=0.2\n"
    other, _ = h.connect(b"GET / HTTP/1.1\r\n", peer="127.0.0.1")
    assert isinstance(other.layer, _Refuse)
    assert h.addon.open_per_vm == {}
    assert h.events == []
    h.time += 31
    assert len(h.addon.undecided_expired()) == 3  # a probe that never finishes is closed too


# ---- HTTP requests ------------------------------------------------------------------------------------------


def request(
    h: Harness, host: str, *, first: bytes = b"GET / HTTP/1.1\r\n", sni: str | None = None
) -> http.HTTPFlow:
    """A request on a connection the addon decided (plain HTTP, or intercepted TLS for ``sni``)."""
    data = client_hello(sni) if sni else first
    _nl, ctx = h.connect(data, dst=("198.18.1.1", 443 if sni else 80))
    flow = tflow()
    flow.client_conn = ctx.client
    flow.request.host = ctx.server.address[0] if ctx.server.address else "198.18.1.1"
    flow.request.headers["Host"] = host
    flow.request.headers["Authorization"] = "Bearer CORRAL_PROXY_tok"
    asyncio.run(h.addon.requestheaders(flow))
    return flow


def test_plain_http_goes_to_the_hosts_own_address_keeping_the_host_header() -> None:
    h = Harness()
    flow = request(h, "a.wild.test")
    assert flow.response is None
    assert flow.request.host == "198.18.1.5"
    assert flow.request.host_header == "a.wild.test"
    assert flow.request.headers["Authorization"] == "Bearer CORRAL_PROXY_tok"  # never injected over HTTP
    assert (h.events[-1].protocol, h.events[-1].host) == ("http", "a.wild.test")


def test_plain_http_to_a_denied_host_gets_403() -> None:
    h = Harness()
    flow = request(h, "other.test")
    assert flow.response is not None
    assert flow.response.status_code == 403
    assert h.events[-1].verdict == "denied"


def test_intercepted_request_gets_the_secret_and_another_host_gets_421() -> None:
    h = Harness()
    flow = request(h, "api.secret.test", sni="api.secret.test")
    assert flow.response is None
    assert flow.request.headers["Authorization"] == "Bearer real-value"
    flow = request(h, "allowed.test", sni="api.secret.test")
    assert flow.response is not None
    assert flow.response.status_code == 421
    assert flow.request.headers["Authorization"] == "Bearer CORRAL_PROXY_tok"


def test_connect_and_absolute_form_naming_another_host_are_refused() -> None:
    h = Harness()
    flow = request(h, "allowed.test")
    flow.request.method = "CONNECT"
    flow.response = None
    asyncio.run(h.addon.requestheaders(flow))
    assert flow.response is not None
    assert flow.response.status_code == 403
    flow = request(h, "allowed.test")
    flow.request.authority = "other.test"
    flow.response = None
    asyncio.run(h.addon.requestheaders(flow))
    assert flow.response is not None
    assert flow.response.status_code == 403


# ---- failing closed -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"X ", b"GET /pa", client_hello("allowed.test")[:40]])
def test_mitmproxys_own_detection_never_decides_a_top_level_connection(data: bytes) -> None:
    from corral.egress.addon import TopLevelOnly

    nl, _ = Harness().connect(data, dst=("203.0.113.9", 4444))
    assert nl.layer is None  # Corral waits for more bytes ...
    TopLevelOnly().next_layer(nl)
    assert nl.layer is None  # ... and mitmproxy's addon does not step in


def test_a_connection_that_never_decides_is_refused_past_a_limit() -> None:
    h = Harness()
    nl, _ = h.connect(b"GET /" + b"a" * (70 * 1024), dst=("198.18.1.1", 80))
    assert isinstance(nl.layer, _Refuse)


class BrokenResolver(FakeResolver):
    async def resolve(self, name: str) -> list[str]:
        raise UnicodeError("label too long")


def test_a_name_the_resolver_chokes_on_is_refused_not_let_through() -> None:
    h = Harness(WARN)
    h.addon.resolver = BrokenResolver()
    flow = request(h, "a" * 70 + ".wild.test")
    assert flow.response is not None
    assert flow.response.status_code == 403
    nl, _ = h.connect(client_hello("allowed.test"))
    assert isinstance(nl.layer, _Refuse)


def test_each_request_uses_the_policy_and_secrets_as_they_are_now() -> None:
    h = Harness()
    _nl, ctx = h.connect(client_hello("api.secret.test"))  # decided (intercepted) with the secret in place

    def ask() -> http.HTTPFlow:
        flow = tflow()
        flow.client_conn = ctx.client
        flow.request.host = "198.18.1.3"
        flow.request.headers["Host"] = "api.secret.test"
        flow.request.headers["Authorization"] = "Bearer CORRAL_PROXY_tok"
        asyncio.run(h.addon.requestheaders(flow))
        return flow

    assert ask().request.headers["Authorization"] == "Bearer real-value"
    without_secret = VmEntry("vm_1", "usr_1", Policy.build(ENFORCE, RULES), ())
    without_rules = VmEntry("vm_1", "usr_1", Policy.build(ENFORCE, []), (SECRET,))

    async def now_without_secret(address: str) -> VmEntry | None:
        return without_secret

    async def now_without_rules(address: str) -> VmEntry | None:
        return without_rules

    h.addon.identify = now_without_secret  # the secret was deleted since the connection was decided
    flow = ask()
    assert flow.response is None
    assert flow.request.headers["Authorization"] == "Bearer CORRAL_PROXY_tok"
    h.addon.identify = now_without_rules  # and then the rule
    flow = ask()
    assert flow.response is not None
    assert flow.response.status_code == 421
    assert flow.request.headers["Authorization"] == "Bearer CORRAL_PROXY_tok"


def test_long_lived_flows_keep_only_their_last_message() -> None:
    from mitmproxy.test.tflow import ttcpflow

    flow = ttcpflow()
    flow.messages = flow.messages * 50
    Harness().addon.tcp_message(flow)
    assert len(flow.messages) == 1
