"""What the guest port proxy changes on the way in and out (pure functions on raw ASGI headers):

- to the guest: hop-by-hop headers (and those ``Connection`` names) are dropped, and so are the caller's
  ``Authorization`` and ``Proxy-Authorization``; ``Host`` is the address the guest listens on
  (``127.0.0.1:<port>``); ``X-Forwarded-For`` gets the client's address appended, ``X-Forwarded-Host``,
  ``-Proto`` and ``-Prefix`` say where the caller came from; the ``token`` query parameter is removed from
  the query (on the API's path), and the proxy origin's own cookie from ``Cookie``;
- to the client: hop-by-hop headers and ``Date`` (the API server adds its own) are dropped; a ``Location``
  on the guest's own address or an absolute path is moved under the proxy's prefix, as a reverse proxy
  mounted on a path does. On the API's origin (``api_response_headers``) the guest's ``Set-Cookie`` is
  dropped and ``Content-Security-Policy: sandbox`` added: the page gets an opaque origin and runs no script;
  on the proxy's own origin (``origin_response_headers``) a guest cookie is made host-only (its ``Domain``
  removed), so no VM sets cookies for another's host name, and unless the guest says otherwise the page
  may be framed by its own origin only (``X-Frame-Options: SAMEORIGIN``, ``frame-ancestors 'self'``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import quote, unquote_to_bytes

from corral.api.proxy_tickets import COOKIE, SECURE_COOKIE

GUEST_HOST = "127.0.0.1"
WS_MAX_MESSAGE = 16 * 1024 * 1024  # as uvicorn's default for the client side

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# the API's own (authorization, host, the forwarding headers it sets), and Expect: the API server already
# answered "100 Continue" to the client, the guest must not send it another interim answer
_NOT_FORWARDED = frozenset(
    {b"authorization", b"host", b"expect", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-prefix"}
)
# the WebSocket library makes its own handshake headers
_WS_HANDSHAKE = frozenset({b"content-length", b"user-agent", b"origin"})

# close codes a close frame may carry (RFC 6455 7.4, and the private range)
_SENDABLE = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
        if token.strip()
    }


def without_hop_by_hop(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    drop = HOP_BY_HOP | _connection_tokens(headers)
    return [(name, value) for name, value in headers if name.lower() not in drop]


def proxy_prefix(vm_id: str, port: int) -> str:
    return f"/v1/vms/{quote(vm_id, safe='')}/proxy/{port}"


def guest_target(raw_path: bytes | None, path: str, query: bytes) -> bytes:
    """The request target for the guest: the part of the raw path after ``/proxy/<port>`` (its escapes kept
    as the client sent them, raw bytes a request line may not carry escaped), and the query without
    ``token``."""
    if raw_path is not None and raw_path.count(b"/") >= 6:
        rest = b"/" + raw_path.split(b"/", 6)[6]
    else:
        rest = b"/" + quote(path, safe="/:@!$&'()*+,;=-._~").encode()
    kept = [
        part for part in query.split(b"&") if part and unquote_to_bytes(part.split(b"=", 1)[0]) != b"token"
    ]
    return _escaped(rest + (b"?" + b"&".join(kept) if kept else b""))


def origin_target(raw_path: bytes | None, path: str, query: bytes) -> bytes:
    """The request target for the guest on the proxy's own origin: the path and query as they came."""
    rest = raw_path if raw_path else quote(path, safe="/:@!$&'()*+,;=-._~").encode()
    return _escaped(rest + (b"?" + query if query else b""))


_OURS = frozenset({COOKIE.encode(), SECURE_COOKIE.encode()})


def _without_our_cookie(value: bytes) -> bytes:
    """A ``Cookie`` header without the proxy origin's own cookie (it is never the guest's)."""
    pairs = [p.strip() for p in value.split(b";")]
    return b"; ".join(p for p in pairs if p and p.split(b"=", 1)[0].strip() not in _OURS)


def _cookies_for_guest(headers: Headers) -> Headers:
    out: Headers = []
    for name, value in headers:
        if name == b"cookie":
            value = _without_our_cookie(value)
            if not value:
                continue
        out.append((name, value))
    return out


def _escaped(target: bytes) -> bytes:
    """Bytes a request line may not carry (controls, spaces, non-ASCII a lenient client sent raw) as %XX."""
    return b"".join(bytes([c]) if 0x21 <= c <= 0x7E else b"%%%02X" % c for c in target)


def _forwarded(
    headers: Sequence[tuple[bytes, bytes]], client: str | None, scheme: str, prefix: str
) -> Headers:
    original_host = next((v for n, v in headers if n.lower() == b"host"), b"")
    earlier = [v for n, v in headers if n.lower() == b"x-forwarded-for"]
    chain = b", ".join([*earlier, client.encode()] if client else earlier)
    out: Headers = [(b"x-forwarded-for", chain)] if chain else []
    if original_host:
        out.append((b"x-forwarded-host", original_host))
    out.append((b"x-forwarded-proto", b"https" if scheme in ("https", "wss") else b"http"))
    if prefix:
        out.append((b"x-forwarded-prefix", prefix.encode()))
    return out


def request_headers(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    port: int,
    client: str | None,
    scheme: str,
    prefix: str,
    chunked: bool,
) -> Headers:
    """The headers of the request to the guest. ``chunked``: the body is sent chunked (the client sent it
    so, or without a length)."""
    kept = [
        (name.lower(), value)
        for name, value in without_hop_by_hop(headers)
        if name.lower() not in _NOT_FORWARDED and name.lower() != b"x-forwarded-for"
    ]
    out: Headers = [(b"host", f"{GUEST_HOST}:{port}".encode()), *_cookies_for_guest(kept)]
    if chunked:
        out = [(n, v) for n, v in out if n != b"content-length"] + [(b"transfer-encoding", b"chunked")]
    return out + _forwarded(headers, client, scheme, prefix)


def websocket_headers(
    headers: Sequence[tuple[bytes, bytes]], *, client: str | None, scheme: str, prefix: str
) -> list[tuple[str, str]]:
    """The extra headers of the WebSocket handshake with the guest (the library adds Host, Upgrade and the
    Sec-WebSocket-* headers itself)."""
    kept = [
        (name.lower(), value)
        for name, value in without_hop_by_hop(headers)
        if name.lower() not in _NOT_FORWARDED
        and name.lower() not in _WS_HANDSHAKE
        and name.lower() != b"x-forwarded-for"
        and not name.lower().startswith(b"sec-websocket-")
    ]
    return [
        (n.decode("latin-1"), v.decode("latin-1"))
        for n, v in _cookies_for_guest(kept) + _forwarded(headers, client, scheme, prefix)
    ]


def _location(value: bytes, port: int, prefix: str) -> bytes:
    for origin in (f"http://{GUEST_HOST}:{port}", f"http://localhost:{port}"):
        raw = origin.encode()
        if value == raw or value.startswith(raw + b"/") or value.startswith(raw + b"?"):
            value = value[len(raw) :] or b"/"
            break
    if (
        value.startswith(b"/")
        and not value.startswith(b"//")
        and not value.startswith(prefix.encode() + b"/")
    ):
        return prefix.encode() + value
    return value


def response_headers(headers: Sequence[tuple[bytes, bytes]], *, port: int, prefix: str) -> Headers:
    """The guest's answer's headers as the client gets them."""
    out: Headers = []
    for name, value in without_hop_by_hop(headers):
        lower = name.lower()
        if lower == b"date":
            continue
        out.append((lower, _location(value, port, prefix) if lower == b"location" else value))
    return out


SANDBOX_CSP = (b"content-security-policy", b"sandbox")


def api_response_headers(headers: Sequence[tuple[bytes, bytes]], *, port: int, prefix: str) -> Headers:
    """The guest's answer's headers on the API's origin: no cookies, and a sandboxed (opaque) origin."""
    kept = [(n, v) for n, v in response_headers(headers, port=port, prefix=prefix) if n != b"set-cookie"]
    return [*kept, SANDBOX_CSP]


def _host_only(cookie: bytes) -> bytes:
    parts = [p.strip() for p in cookie.split(b";")]
    return b"; ".join(p for p in parts if p.split(b"=", 1)[0].strip().lower() != b"domain")


FRAME_OPTIONS = (b"x-frame-options", b"SAMEORIGIN")
FRAME_ANCESTORS = (b"content-security-policy", b"frame-ancestors 'self'")


def origin_response_headers(headers: Sequence[tuple[bytes, bytes]], *, port: int) -> Headers:
    """The guest's answer's headers on the proxy's own origin: its cookies host-only, never the proxy's own;
    framing by another site refused unless the guest sets its own ``X-Frame-Options`` or ``frame-ancestors``
    (another site's page would otherwise frame the app with the user's session: clickjacking)."""
    out: Headers = []
    for name, value in response_headers(headers, port=port, prefix=""):
        if name == b"set-cookie":
            if value.split(b"=", 1)[0].strip() in _OURS:
                continue
            value = _host_only(value)
        out.append((name, value))
    if not any(n == b"x-frame-options" for n, _ in out):
        out.append(FRAME_OPTIONS)
    if not any(n == b"content-security-policy" and b"frame-ancestors" in v.lower() for n, v in out):
        out.append(FRAME_ANCESTORS)
    return out


def sendable_close_code(code: int, *, abnormal: int) -> int:
    """A close code the other side can be sent: 1005 (none given) is a normal close; codes no close frame
    may carry (1006 lost connection, 1015 TLS, unassigned ones) become ``abnormal``."""
    if code == 1005:
        return 1000
    if code in _SENDABLE or 3000 <= code <= 4999:
        return code
    return abnormal
