"""The guest proxy's own origin, its logic alone: host names, tickets and sessions, which requests may use
the cookie, and how headers change there and on the API's path."""

from __future__ import annotations

import pytest

from corral.api.proxy_headers import (
    api_response_headers,
    origin_response_headers,
    origin_target,
    request_headers,
    websocket_headers,
)
from corral.api.proxy_tickets import (
    MAX_COOKIE_VALUES,
    KeyCheck,
    TicketBook,
    cookie_name,
    cookie_usable,
    origin_allowed,
    origin_host,
    parse_origin_host,
    without_ticket,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_vm_and_port_has_its_own_host_name() -> None:
    a = origin_host("vm_k3mf9xvw2p", 8080, "localhost")
    assert a == "8080-vm-k3mf9xvw2p.localhost"
    assert parse_origin_host(a, "localhost") == ("vm_k3mf9xvw2p", 8080)
    assert parse_origin_host(a.upper() + ":8001", "localhost") == ("vm_k3mf9xvw2p", 8080)
    assert origin_host("vm_k3mf9xvw2q", 8080, "localhost") != a
    assert origin_host("vm_k3mf9xvw2p", 8081, "localhost") != a
    sub = origin_host("vm_abc", 3000, "proxy.example.com")
    assert parse_origin_host(sub, "proxy.example.com") == ("vm_abc", 3000)


@pytest.mark.parametrize(
    "host",
    [
        "",
        "localhost",
        "127.0.0.1:8001",
        "8080-vm-abc.example.com",  # another domain
        "8080-vm-abc.x.localhost",  # a deeper name
        "08080-vm-abc.localhost",  # one port, one spelling
        "+8080-vm-abc.localhost",
        "0-vm-abc.localhost",
        "65536-vm-abc.localhost",
        "8080-key-abc.localhost",  # not a VM id
        "8080-vm-ABC!.localhost",
        "8080vm-abc.localhost",
        "[::1]:8001",
    ],
)
def test_host_names_that_name_no_vm_port(host: str) -> None:
    assert parse_origin_host(host, "localhost") is None


def test_a_ticket_opens_its_vm_and_port_once() -> None:
    clock = Clock()
    book = TicketBook(clock=clock)
    ticket = book.issue("usr_a", "key_a", "vm_a", 8080)
    session = book.redeem(ticket, "vm_a", 8080)
    assert session is not None
    assert session != ticket
    assert book.redeem(ticket, "vm_a", 8080) is None  # spent
    grant = book.session([session], "vm_a", 8080)
    assert grant is not None
    assert (grant.user_id, grant.key_id) == ("usr_a", "key_a")
    assert book.session([session], "vm_a", 8081) is None  # another port
    assert book.session([session], "vm_b", 8080) is None  # another VM
    assert book.session([ticket], "vm_a", 8080) is None  # a ticket is not a session
    assert book.session(["forged", session], "vm_a", 8080) == grant  # a tossed cookie beside it: ignored
    clock.now += book.session_ttl
    assert book.session([session], "vm_a", 8080) is None  # expired


@pytest.mark.parametrize(("vm", "port"), [("vm_a", 8081), ("vm_b", 8080)])
def test_a_ticket_for_another_vm_or_port_is_refused_and_spent(vm: str, port: int) -> None:
    book = TicketBook(clock=Clock())
    ticket = book.issue("usr_a", "key_a", "vm_a", 8080)
    assert book.redeem(ticket, vm, port) is None
    assert book.redeem(ticket, "vm_a", 8080) is None


def test_an_expired_ticket_is_refused() -> None:
    clock = Clock()
    book = TicketBook(clock=clock)
    ticket = book.issue("usr_a", "key_a", "vm_a", 8080)
    clock.now += book.ticket_ttl
    assert book.redeem(ticket, "vm_a", 8080) is None


def test_the_book_stays_bounded() -> None:
    clock = Clock()
    book = TicketBook(clock=clock, max_entries=3)
    tickets = [book.issue("usr_a", "key_a", "vm_a", 1) for _ in range(5)]
    assert book.redeem(tickets[0], "vm_a", 1) is None  # the oldest went first
    assert book.redeem(tickets[4], "vm_a", 1) is not None


def test_other_sites_may_not_use_the_cookie_but_for_a_link() -> None:
    assert cookie_usable("GET", None, None)  # older browsers, programs
    assert cookie_usable("POST", "same-origin", "cors")
    assert cookie_usable("GET", "none", "navigate")  # typed or opened by the user
    assert cookie_usable("GET", "cross-site", "navigate")
    assert not cookie_usable("POST", "same-site", "navigate")  # a form of another VM's page
    assert not cookie_usable("GET", "same-site", "cors")  # fetch() from another VM's page
    assert not cookie_usable("GET", "cross-site", "no-cors")
    assert not cookie_usable("GET", "same-site", "websocket")


def test_the_proxy_cookie_never_reaches_the_guest() -> None:
    incoming = [
        (b"host", b"8080-vm-a.localhost:8001"),
        (b"cookie", b"app=1; corral_proxy=SECRET; other=2"),
        (b"cookie", b"corral_proxy=SECRET2"),
    ]
    out = request_headers(incoming, port=8080, client=None, scheme="http", prefix="", chunked=False)
    assert [v for n, v in out if n == b"cookie"] == [b"app=1; other=2"]
    assert b"x-forwarded-prefix" not in [n for n, _ in out]  # served at the root
    ws = websocket_headers(incoming, client=None, scheme="http", prefix="")
    assert [v for n, v in ws if n == "cookie"] == ["app=1; other=2"]


def test_answers_on_the_api_origin_are_sandboxed_and_set_no_cookie() -> None:
    guest = [(b"Set-Cookie", b"a=1"), (b"Content-Type", b"text/html"), (b"Location", b"/x")]
    out = api_response_headers(guest, port=8080, prefix="/v1/vms/vm_a/proxy/8080")
    assert out == [
        (b"content-type", b"text/html"),
        (b"location", b"/v1/vms/vm_a/proxy/8080/x"),
        (b"content-security-policy", b"sandbox"),
    ]


def test_guest_cookies_on_the_origin_are_host_only() -> None:
    guest = [
        (b"Set-Cookie", b"a=1; Domain=localhost; Path=/; HttpOnly"),
        (b"Set-Cookie", b"b=2; domain=.localhost"),
        (b"Set-Cookie", b"corral_proxy=forged; Path=/"),
        (b"Set-Cookie", b"__Host-corral_proxy=forged; Path=/; Secure"),
        (b"Location", b"http://127.0.0.1:8080/next"),
    ]
    assert origin_response_headers(guest, port=8080) == [
        (b"set-cookie", b"a=1; Path=/; HttpOnly"),
        (b"set-cookie", b"b=2"),
        (b"location", b"/next"),
        (b"x-frame-options", b"SAMEORIGIN"),
        (b"content-security-policy", b"frame-ancestors 'self'"),
    ]


def test_other_sites_may_not_frame_a_guest_port_unless_the_guest_says_so() -> None:
    own = [(b"X-Frame-Options", b"DENY"), (b"Content-Security-Policy", b"default-src 'self'")]
    out = origin_response_headers(own, port=8080)
    assert [v for n, v in out if n == b"x-frame-options"] == [b"DENY"]  # the guest's own is kept
    assert (b"content-security-policy", b"frame-ancestors 'self'") in out  # its CSP says nothing of it
    allowed = [(b"Content-Security-Policy", b"frame-ancestors https://app.example")]
    out = origin_response_headers(allowed, port=8080)
    assert [v for n, v in out if n == b"content-security-policy"] == [b"frame-ancestors https://app.example"]


def test_the_proxy_cookie_is_never_passed_to_the_guest_under_either_name() -> None:
    incoming = [(b"cookie", b"__Host-corral_proxy=s1; app=1; corral_proxy=s2")]
    out = request_headers(incoming, port=8080, client=None, scheme="https", prefix="", chunked=False)
    assert [v for n, v in out if n == b"cookie"] == [b"app=1"]
    assert cookie_name("https") == "__Host-corral_proxy"  # a sibling host cannot set one (no Domain allowed)
    assert cookie_name("http") == "corral_proxy"


@pytest.mark.parametrize(
    ("origin", "method", "websocket", "allowed"),
    [
        (None, "POST", False, True),  # a program; browsers always send Origin on these
        (None, "GET", True, True),
        ("http://8080-vm-a.corral.test:8001", "GET", True, True),
        ("HTTP://8080-VM-A.corral.test:8001", "POST", False, True),
        ("http://8081-vm-b.corral.test:8001", "GET", True, False),  # another VM's page: same site
        ("http://8081-vm-b.corral.test:8001", "POST", False, False),
        ("http://8081-vm-b.corral.test:8001", "GET", False, False),  # a CORS fetch from another origin
        ("http://8080-vm-a.corral.test", "GET", True, False),  # another port is another origin
        ("https://8080-vm-a.corral.test:8001", "DELETE", False, False),  # another scheme
        ("null", "POST", False, False),  # a sandboxed frame, a data: URL
        ("http://8080-vm-a.corral.test:8001.evil", "POST", False, False),
    ],
)
def test_only_the_ports_own_origin_may_open_websockets_or_write(
    origin: str | None, method: str, websocket: bool, allowed: bool
) -> None:
    host = "8080-vm-a.corral.test:8001"
    assert origin_allowed(origin, method, websocket=websocket, scheme="http", host=host) is allowed


@pytest.mark.parametrize(
    ("raw_path", "location"),
    [
        (b"//evil.example/x", "/evil.example/x"),
        (b"///evil.example", "/evil.example"),
        (b"/\\evil.example", "/evil.example"),
        (b"/\\/evil.example", "/evil.example"),
        (b"/%2F%2Fevil.example", "/%2F%2Fevil.example"),  # escaped: a path segment, not an authority
        (b"", "/"),
    ],
)
def test_the_redirect_after_a_ticket_stays_on_the_origin(raw_path: bytes, location: str) -> None:
    got = without_ticket(raw_path, b"corral_ticket=T")
    assert got == location
    assert got.startswith("/")
    assert got[1:2] not in ("/", "\\")


def test_a_host_with_junk_after_the_port_names_no_vm() -> None:
    assert parse_origin_host("8080-vm-abc.localhost:8001@evil", "localhost") is None
    assert parse_origin_host("8080-vm-abc.localhost:", "localhost") is None
    assert parse_origin_host("8080-vm-abc.localhost:8001", "localhost") == ("vm_abc", 8080)


def test_ending_a_key_ends_its_tickets_and_sessions_only() -> None:
    book = TicketBook(clock=Clock())
    mine = book.redeem(book.issue("usr_a", "key_a", "vm_a", 80), "vm_a", 80)
    other = book.redeem(book.issue("usr_a", "key_b", "vm_a", 80), "vm_a", 80)
    waiting = book.issue("usr_a", "key_a", "vm_a", 80)
    assert mine is not None
    assert other is not None
    book.end_key("key_a")
    assert book.session([mine], "vm_a", 80) is None
    assert book.redeem(waiting, "vm_a", 80) is None
    assert book.session([other], "vm_a", 80) is not None


def test_tossed_cookie_values_are_tried_up_to_a_bound() -> None:
    book = TicketBook(clock=Clock())
    real = book.redeem(book.issue("usr_a", "key_a", "vm_a", 80), "vm_a", 80)
    assert real is not None
    assert book.session([*["tossed"] * 3, real], "vm_a", 80) is not None
    assert book.session([*["tossed"] * MAX_COOKIE_VALUES, real], "vm_a", 80) is None


def test_key_checks_are_cached_a_few_seconds_and_revocation_sticks() -> None:
    clock = Clock()
    check = KeyCheck(clock=clock, ttl=5.0)
    assert check.known("key_a") is None  # ask the database
    check.record("key_a", True)
    assert check.known("key_a") is True
    clock.now += 5.0
    assert check.known("key_a") is None  # stale: ask again
    check.record("key_a", False)
    clock.now += 1000
    assert check.known("key_a") is False


def test_the_origins_target_is_the_path_as_it_came() -> None:
    assert origin_target(b"/a%20b/c", "/a b/c", b"x=1&token=kept") == b"/a%20b/c?x=1&token=kept"
    assert origin_target(None, "/a b", b"") == b"/a%20b"


def test_the_redirect_after_a_ticket_keeps_the_url_as_it_came() -> None:
    query = b"a=1&corral_ticket=T0k&x=a%2Fb&flag&corral%5Fticket=again"
    assert without_ticket(b"/app/a%20b%2Fc", query) == "/app/a%20b%2Fc?a=1&x=a%2Fb&flag"
    assert without_ticket(b"/", b"corral_ticket=T") == "/"
    assert without_ticket(b"/\xc3\xa9", b"") == "/%C3%A9"
