"""What the guest port proxy forwards and returns: headers, request targets, locations and close codes."""

from __future__ import annotations

import pytest

from corral.api.proxy_headers import (
    guest_target,
    proxy_prefix,
    request_headers,
    response_headers,
    sendable_close_code,
    websocket_headers,
    without_hop_by_hop,
)

PREFIX = "/v1/vms/vm_abc/proxy/8080"


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n for n, _ in headers]


def test_hop_by_hop_headers_and_those_connection_names_are_dropped() -> None:
    headers = [
        (b"Connection", b"keep-alive, X-Secret-Hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Secret-Hop", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"TE", b"trailers"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Accept", b"*/*"),
    ]
    assert without_hop_by_hop(headers) == [(b"Accept", b"*/*")]


def test_request_headers_for_the_guest() -> None:
    incoming = [
        (b"host", b"corral.example:8443"),
        (b"authorization", b"Bearer corral_live_secret"),
        (b"x-forwarded-for", b"203.0.113.9"),
        (b"x-forwarded-host", b"spoofed"),
        (b"x-forwarded-prefix", b"/spoofed"),
        (b"cookie", b"session=guest-app"),
        (b"content-length", b"5"),
        (b"expect", b"100-continue"),
        (b"accept", b"text/html"),
    ]
    out = request_headers(
        incoming, port=8080, client="198.51.100.7", scheme="https", prefix=PREFIX, chunked=False
    )
    assert out == [
        (b"host", b"127.0.0.1:8080"),
        (b"cookie", b"session=guest-app"),
        (b"content-length", b"5"),
        (b"accept", b"text/html"),
        (b"x-forwarded-for", b"203.0.113.9, 198.51.100.7"),
        (b"x-forwarded-host", b"corral.example:8443"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-prefix", PREFIX.encode()),
    ]


def test_a_body_without_a_length_goes_chunked() -> None:
    incoming = [(b"host", b"h"), (b"transfer-encoding", b"chunked")]
    out = request_headers(incoming, port=1, client=None, scheme="http", prefix=PREFIX, chunked=True)
    assert out.count((b"transfer-encoding", b"chunked")) == 1
    assert b"content-length" not in names(out)
    assert b"x-forwarded-for" not in names(out)  # no client address known, none invented


def test_websocket_handshake_headers_leave_the_handshake_to_the_library() -> None:
    incoming = [
        (b"host", b"corral.example"),
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-key", b"abc"),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-protocol", b"echo.v1"),
        (b"authorization", b"Bearer k"),
        (b"origin", b"https://corral.example"),
        (b"user-agent", b"browser"),
        (b"cookie", b"c=1"),
    ]
    out = websocket_headers(incoming, client="10.0.0.1", scheme="wss", prefix=PREFIX)
    assert out == [
        ("cookie", "c=1"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-host", "corral.example"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-prefix", PREFIX),
    ]


@pytest.mark.parametrize(
    ("raw_path", "path", "query", "target"),
    [
        (b"/v1/vms/vm_abc/proxy/8080/", "", b"", b"/"),
        (b"/v1/vms/vm_abc/proxy/8080/a%2Fb/c%20d", "a/b/c d", b"x=1", b"/a%2Fb/c%20d?x=1"),
        (b"/v1/vms/vm_abc/proxy/8080/p", "p", b"token=k&a=1&token=j&b", b"/p?a=1&b"),
        (b"/v1/vms/vm_abc/proxy/8080/p", "p", b"%74oken=k", b"/p"),  # an escaped name is still token
        (b"/v1/vms/vm_abc/proxy/8080/p", "p", b"tokens=1&my_token=2", b"/p?tokens=1&my_token=2"),
        (None, "a b/c", b"", b"/a%20b/c"),
        (b"/v1/vms/vm_abc/proxy/8080/\xc3\xa9", "\u00e9", b"q=\xff", b"/%C3%A9?q=%FF"),
    ],
)
def test_the_target_keeps_the_clients_escapes_and_drops_the_token(
    raw_path: bytes | None, path: str, query: bytes, target: bytes
) -> None:
    assert guest_target(raw_path, path, query) == target


def test_response_headers_and_locations() -> None:
    guest = [
        (b"Content-Type", b"text/html"),
        (b"Connection", b"close"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Location", b"/login?next=/"),
    ]
    assert response_headers(guest, port=8080, prefix=PREFIX) == [
        (b"content-type", b"text/html"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"location", PREFIX.encode() + b"/login?next=/"),
    ]

    def moved(value: bytes) -> bytes:
        return response_headers([(b"location", value)], port=8080, prefix=PREFIX)[0][1]

    assert moved(b"http://127.0.0.1:8080/a") == PREFIX.encode() + b"/a"
    assert moved(b"http://localhost:8080") == PREFIX.encode() + b"/"
    assert moved(PREFIX.encode() + b"/already") == PREFIX.encode() + b"/already"  # the app knows its prefix
    assert moved(b"relative/page") == b"relative/page"
    assert moved(b"https://example.com/x") == b"https://example.com/x"
    assert moved(b"//example.com/x") == b"//example.com/x"
    assert moved(b"http://127.0.0.1:9999/other-port") == b"http://127.0.0.1:9999/other-port"


def test_prefix_escapes_the_vm_id() -> None:
    assert proxy_prefix("vm_abc", 8080) == PREFIX
    assert proxy_prefix("a/b", 1) == "/v1/vms/a%2Fb/proxy/1"


def test_close_codes_that_can_be_sent() -> None:
    assert sendable_close_code(1000, abnormal=1011) == 1000
    assert sendable_close_code(4001, abnormal=1011) == 4001
    assert sendable_close_code(1005, abnormal=1011) == 1000  # no code given: a normal close
    assert sendable_close_code(1006, abnormal=1011) == 1011  # connection lost
    assert sendable_close_code(1006, abnormal=1001) == 1001
    assert sendable_close_code(1015, abnormal=1011) == 1011
    assert sendable_close_code(2000, abnormal=1011) == 1011
