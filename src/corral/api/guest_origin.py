"""The guest proxy's own origin: a second listener of ``corral serve`` (``CORRAL_PROXY_PORT``) that serves
``http://<port>-<vm id>.<CORRAL_PROXY_DOMAIN>/...`` from ``127.0.0.1:<port>`` inside that VM, for browsers.

Each VM and port is its own origin, none is the API's, so a guest's page can neither read the API nor
another VM's pages: a WebSocket handshake, any method but GET and HEAD, and any request that carries an
``Origin`` must come from the port's own origin (403 ``cross_origin``), since all VM origins under one
domain are the same site and browsers send the Lax cookie between them. Access is by ticket then cookie (``corral.api.proxy_tickets``): a request carrying
``?corral_ticket=`` spends it for an HttpOnly host-only cookie and is redirected to the same URL without
it; every other request needs that cookie. API keys are not accepted here, and the cookie is never passed
to the guest. Requests and answers are relayed as on the API's path (``corral.api.routers.proxy``), the
guest's cookies made host-only and framing by other origins refused unless the guest allows it.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from corral.api.deps import AppState, charge, client_key
from corral.api.errors import error_response
from corral.api.proxy_headers import origin_response_headers, origin_target
from corral.api.proxy_tickets import (
    TICKET_PARAM,
    KeyCheck,
    cookie_name,
    cookie_usable,
    origin_allowed,
    parse_origin_host,
    without_ticket,
)
from corral.api.routers.proxy import (
    Opened,
    RelayResponse,
    deny,
    open_guest,
    relay_request,
    relay_websocket,
    tickets_of,
)
from corral.api.routers.vms import lifecycle_of
from corral.domain.errors import CorralError, NotFound, Unauthorized
from corral.services.lifecycle import Lifecycle
from corral.store.tables import ApiKey

NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


class CrossOrigin(CorralError):
    status = 403
    code = "cross_origin"


_key_checks: weakref.WeakKeyDictionary[Lifecycle, KeyCheck] = weakref.WeakKeyDictionary()


def _key_check(st: AppState) -> KeyCheck:
    life = lifecycle_of(st)
    check = _key_checks.get(life)
    if check is None:
        check = _key_checks.setdefault(life, KeyCheck())
    return check


def _cookie_values(conn: HTTPConnection, name: str) -> list[str]:
    """Every value of the proxy cookie the request carries (over http a page of another VM under the same
    domain may have set one with ``Domain=``: each is tried, up to a bound)."""
    values: list[str] = []
    for header, raw in conn.scope["headers"]:
        if header.lower() != b"cookie":
            continue
        for part in raw.decode("latin-1").split(";"):
            key, eq, value = part.strip().partition("=")
            if eq and key == name and value:
                values.append(value)
    return values


def _read_key_live(st: AppState, key_id: str) -> bool:
    """Whether the API key a ticket was asked with is still valid, from the database. Blocking: one read."""
    with (st.reads or st.sessions)() as session:
        key = session.get(ApiKey, key_id)
        live = key is not None and key.revoked_at is None
    _key_check(st).record(key_id, live)
    if not live:
        tickets_of(st).end_key(key_id)
    return live


async def _key_live(st: AppState, key_id: str) -> bool:
    """The same, answered from a cache of a few seconds when it can (a revoked key ends its proxy sessions
    within ``KEY_CHECK_TTL`` seconds, and a request costs no database read most of the time)."""
    known = _key_check(st).known(key_id)
    if known is not None:
        return known
    return await run_in_threadpool(_read_key_live, st, key_id)


def _target(conn: HTTPConnection, st: AppState) -> tuple[str, int]:
    where = parse_origin_host(conn.headers.get("host", ""), st.settings.proxy_domain)
    if where is None:
        raise NotFound(
            f"No VM port is served at this host name (<port>-<vm id>.{st.settings.proxy_domain})",
            code="not_found",
        )
    return where


def _check_origin(conn: HTTPConnection, st: AppState, method: str, *, websocket: bool) -> None:
    """403 ``cross_origin`` for a request another origin's page made (see ``origin_allowed``)."""
    allowed = origin_allowed(
        conn.headers.get("origin"),
        method,
        websocket=websocket,
        scheme=st.settings.proxy_scheme,
        host=conn.headers.get("host", ""),
    )
    if not allowed:
        charge(st, st.anon_limiter, client_key(conn))
        raise CrossOrigin("Requests to this VM port from another origin's page are refused")


async def _open(conn: HTTPConnection, st: AppState, method: str) -> Opened:
    """The VM's port named by the host, for the holder of a session cookie for it, with a slot of the
    proxy's bulkhead (per API key the ticket was asked with, per VM); each request is charged to the VM's
    rate limit."""
    vm_id, port = _target(conn, st)
    usable = cookie_usable(method, conn.headers.get("sec-fetch-site"), conn.headers.get("sec-fetch-mode"))
    values = _cookie_values(conn, cookie_name(st.settings.proxy_scheme))
    grant = tickets_of(st).session(values, vm_id, port) if usable else None
    if grant is None or not await _key_live(st, grant.key_id):
        charge(st, st.anon_limiter, client_key(conn))
        raise Unauthorized(
            "Open this port with a URL from POST /v1/vms/{vm_id}/proxy-ticket (API keys are not accepted here)"
        )
    charge(st, st.key_limiter, f"proxy-vm:{vm_id}")
    return await open_guest(st, grant.user_id, vm_id, port, [("key", grant.key_id), ("vm", vm_id)])


def _redeem(request: Request, st: AppState, ticket: str) -> Response:
    """Spend the ticket for a cookie and send the browser to the same URL without it. Blocking (cheap)."""
    vm_id, port = _target(request, st)
    book = tickets_of(st)
    session = book.redeem(ticket, vm_id, port)
    grant = book.session([session], vm_id, port) if session is not None else None
    if session is None or grant is None or not _read_key_live(st, grant.key_id):
        charge(st, st.anon_limiter, client_key(request))
        raise Unauthorized(
            "The ticket is unknown, used, expired or for another VM or port: ask for a new one"
        )
    location = without_ticket(request.scope.get("raw_path") or b"/", request.scope.get("query_string", b""))
    secure = "; Secure" if st.settings.proxy_scheme == "https" else ""
    name = cookie_name(st.settings.proxy_scheme)
    cookie = f"{name}={session}; Path=/; Max-Age={int(book.session_ttl)}; HttpOnly; SameSite=Lax{secure}"
    return Response(status_code=303, headers={**NO_STORE, "Location": location, "Set-Cookie": cookie})


def _ticket(request: Request) -> str | None:
    for key, value in parse_qsl(request.url.query, keep_blank_values=True):
        if key == TICKET_PARAM:
            return value
    return None


class GuestOrigin:
    """The ASGI app of the proxy origin; it shares the API app's state (``AppState``)."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            response = await self._http(Request(scope, receive))
            await response(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(WebSocket(scope, receive, send))

    async def _http(self, request: Request) -> Response:
        st = self.state
        try:
            _check_origin(request, st, request.method, websocket=False)
            ticket = _ticket(request)
            if ticket is not None:
                return await run_in_threadpool(_redeem, request, st, ticket)
            opened = await _open(request, st, request.method)
            try:
                target = origin_target(
                    request.scope.get("raw_path"), request.url.path, request.scope.get("query_string", b"")
                )
                relay = await relay_request(request, opened.forward, target, "")
            except BaseException:
                opened.release()
                raise
        except CorralError as exc:
            return error_response(exc.status, exc.code, exc.message, _headers(exc))
        headers = origin_response_headers(relay.headers, port=opened.forward.port)
        return RelayResponse(relay, headers, opened.release)

    async def _websocket(self, websocket: WebSocket) -> None:
        st = self.state
        try:
            _check_origin(websocket, st, "GET", websocket=True)
            opened = await _open(websocket, st, "GET")
        except CorralError as exc:
            await deny(websocket, error_response(exc.status, exc.code, exc.message, _headers(exc)))
            return
        try:
            target = origin_target(
                websocket.scope.get("raw_path"), websocket.url.path, websocket.scope.get("query_string", b"")
            )
            port = opened.forward.port
            await relay_websocket(
                websocket, opened.forward, target, "", lambda raw: origin_response_headers(raw, port=port)
            )
        finally:
            opened.release()


def _headers(exc: CorralError) -> dict[str, str] | None:
    retry = getattr(exc, "retry_after", None)
    return {"Retry-After": str(retry)} if retry else None


class ByListener:
    """One ASGI app for both listeners of ``corral serve``: requests that arrive on the proxy port go to the
    proxy origin, all else (lifespan included) to the API. The port the connection was accepted on decides,
    never a header."""

    def __init__(self, api: ASGIApp, guest: ASGIApp, guest_ports: Sequence[int]) -> None:
        self.api = api
        self.guest = guest
        self.guest_ports = frozenset(guest_ports)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] in ("http", "websocket") and server and server[1] in self.guest_ports:
            await self.guest(scope, receive, send)
        else:
            await self.api(scope, receive, send)
