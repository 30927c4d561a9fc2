"""``/v1/vms/{vm_id}/proxy/{port}/{path}``: HTTP and WebSocket to a server listening inside the caller's VM
(isorun's "Reverse-proxy a guest port").

The server connects from the host into the sandbox's network namespace (``corral.node.guestnet``), so a
server bound to 127.0.0.1 inside is reached; nothing of the sandbox is published on the host. Bodies are
streamed both ways (an upload is never held in memory, a download is relayed as the guest sends it). How
requests and answers are rewritten is in ``corral.api.proxy_headers``, the HTTP/1.1 exchange with the guest in
``corral.api.guest_http``.

Browsers do not use this path: a page served here would share the API's origin. They open a VM's port on
the proxy's own origin (``corral.api.guest_origin``) with a ticket from ``POST /v1/vms/{id}/proxy-ticket``
(``corral.api.proxy_tickets``). Here the caller authenticates with the ``Authorization`` header only, and
the guest's answer gets ``Content-Security-Policy: sandbox`` and loses its ``Set-Cookie``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Annotated

import h11
import httpcore
from fastapi import APIRouter, Path, Request, WebSocket
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from corral.api import schemas
from corral.api.deps import AppState, PrincipalDep, StateDep, authenticate_connection, connection_state
from corral.api.errors import error_response
from corral.api.guest_http import Forward, Relay
from corral.api.proxy_headers import (
    GUEST_HOST,
    WS_MAX_MESSAGE,
    Headers,
    api_response_headers,
    guest_target,
    proxy_prefix,
    request_headers,
    sendable_close_code,
    websocket_headers,
)
from corral.api.proxy_tickets import TICKET_PARAM, TicketBook, origin_host
from corral.api.routers.common import AUTHED, errors
from corral.api.routers.vms import lifecycle_of
from corral.domain.bulkhead import Bulkhead, Caps
from corral.domain.bulkhead import Scope as Slot
from corral.domain.errors import BadRequest, Conflict, CorralError, InvalidParameter
from corral.node.guestnet import GuestUnreachable, SandboxDialer, SandboxGone, connect_socket
from corral.services.lifecycle import Lifecycle

router = APIRouter(prefix="/v1/vms", tags=["proxy"])
VmId = Annotated[str, Path(description="The VM ID")]
Port = Annotated[int, Path(description="A TCP port inside the VM (1-65535)", ge=1, le=65535)]
GuestPath = Annotated[str, Path(description="The path on the guest's server (may be empty)")]

CONNECT_TIMEOUT = 5.0
MAX_PER_KEY = 64  # proxied requests and WebSockets open at once per API key (or proxy session)
MAX_PER_VM = 128  # ... and per VM
READ_TIMEOUT = 300.0  # between two reads from the guest (its answer's head included)
_DENIAL_HEADERS = (
    b"content-type",
    b"location",
    b"www-authenticate",
    b"set-cookie",
    b"content-security-policy",
)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
DESCRIPTION = (
    "Forwards the request to `http://127.0.0.1:{port}/{path}` inside the VM, as HTTP/1.1, and relays the "
    "guest's answer (status, headers, body) as it comes. Every method works (GET, POST, PUT, PATCH, DELETE, "
    "HEAD, OPTIONS), and a WebSocket on the same path is relayed to the guest. Auth by `Authorization: "
    "Bearer` only (never forwarded; a `token` query parameter is not accepted and not forwarded). For "
    "programs: the answer gets `Content-Security-Policy: sandbox` and no `Set-Cookie`; browsers open the "
    "port on the proxy's own origin (`POST /v1/vms/{vm_id}/proxy-ticket`). Bodies are streamed both ways, "
    "of any size. 502 `upstream_unreachable` when nothing listens on the port, 504 `upstream_timeout` when "
    "the guest does not answer within 300 s."
)


class UpstreamUnreachable(CorralError):
    status = 502
    code = "upstream_unreachable"


class UpstreamTimeout(CorralError):
    status = 504
    code = "upstream_timeout"


_PROXY_ERRORS = {
    **errors(*AUTHED, 404, 409),
    200: {"description": "The guest's answer, whatever its status and content type", "content": {"*/*": {}}},
    502: {"description": "Nothing accepts connections on that port inside the VM"},
    504: {"description": "The guest did not answer in time"},
}
for _status in (502, 504):
    _PROXY_ERRORS[_status]["content"] = {
        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}
    }


_dialers: weakref.WeakKeyDictionary[Lifecycle, SandboxDialer] = weakref.WeakKeyDictionary()
_books: weakref.WeakKeyDictionary[Lifecycle, TicketBook] = weakref.WeakKeyDictionary()
_bulkheads: weakref.WeakKeyDictionary[Lifecycle, Bulkhead] = weakref.WeakKeyDictionary()


def tickets_of(st: AppState) -> TicketBook:
    """The app's proxy tickets and sessions (one book per lifecycle, made on first use)."""
    life = lifecycle_of(st)
    book = _books.get(life)
    if book is None:
        book = _books.setdefault(life, TicketBook(session_ttl=st.settings.proxy_session_ttl_s))
    return book


def dialer_of(st: AppState) -> SandboxDialer:
    """The app's dialer into sandboxes (one per lifecycle, made on first use)."""
    life = lifecycle_of(st)
    dialer = _dialers.get(life)
    if dialer is None:
        dialer = _dialers.setdefault(life, SandboxDialer(life.node.pid))
    return dialer


def proxy_bulkhead(st: AppState) -> Bulkhead:
    """Proxied requests and WebSockets open at once, per API key (a proxy cookie counts for the key its
    ticket was asked with) and per VM (one bulkhead per app)."""
    life = lifecycle_of(st)
    held = _bulkheads.get(life)
    if held is None:
        caps = Caps({"key": MAX_PER_KEY, "vm": MAX_PER_VM})
        held = _bulkheads.setdefault(life, Bulkhead("proxied request", caps))
    return held


async def _open_guest(conn: HTTPConnection, st: AppState, vm_id: str, port: int) -> Opened:
    """The caller (by the ``Authorization`` header), their running VM, and a socket connected to ``port``
    inside it, holding a slot of the proxy's bulkhead, or the API error saying why not."""
    who = await run_in_threadpool(authenticate_connection, conn, st, allow_query=False)
    return await open_guest(st, who.user_id, vm_id, port, [("key", who.key_id), ("vm", vm_id)])


class Opened:
    """A connection to a guest's port and the bulkhead slots it holds (``release`` when the relay ends)."""

    def __init__(self, forward: Forward, bulkhead: Bulkhead, scopes: list[Slot]) -> None:
        self.forward = forward
        self._bulkhead = bulkhead
        self._scopes: list[Slot] | None = scopes

    def release(self) -> None:
        if self._scopes is not None:
            self._bulkhead.release(self._scopes)
            self._scopes = None


def _socket_for(st: AppState, user_id: str, vm_id: str, port: int) -> tuple[socket.socket, tuple[str, int]]:
    """``user_id``'s running VM and a socket made in its network namespace. Blocking, briefly (one read)."""
    cid = lifecycle_of(st).running_container(user_id, vm_id)
    try:
        return dialer_of(st).socket(cid, GUEST_HOST, port)
    except SandboxGone:
        raise Conflict("VM is not running", code="vm_not_running") from None


async def open_guest(st: AppState, user_id: str, vm_id: str, port: int, scopes: list[Slot]) -> Opened:
    """A socket connected to ``port`` inside ``user_id``'s running VM, with a slot in each of ``scopes`` of
    the proxy's bulkhead (429 ``too_many_concurrent`` when one is full). The connect is awaited on the event
    loop: a guest that never accepts holds no worker thread."""
    bulkhead = proxy_bulkhead(st)
    bulkhead.acquire(scopes)
    try:
        sock, address = await run_in_threadpool(_socket_for, st, user_id, vm_id, port)
        try:
            await connect_socket(sock, address, CONNECT_TIMEOUT)
        except GuestUnreachable:
            raise UpstreamUnreachable(f"Nothing accepts connections on port {port} inside the VM") from None
        sock.setblocking(True)  # as the dialer's sockets: their users set their own mode
    except BaseException:
        bulkhead.release(scopes)
        raise
    return Opened(Forward(sock, port), bulkhead, scopes)


@router.api_route(
    "/{vm_id}/proxy/{port}/{path:path}",
    methods=["GET"],
    summary="Reverse-proxy a guest port",
    description=DESCRIPTION,
    responses=_PROXY_ERRORS,
    response_class=Response,
)
@router.api_route("/{vm_id}/proxy/{port}/{path:path}", methods=METHODS[1:], include_in_schema=False)
async def proxy(request: Request, vm_id: VmId, port: Port, path: GuestPath) -> Response:
    opened = await _open_guest(request, connection_state(request), vm_id, port)
    try:
        prefix = proxy_prefix(vm_id, port)
        scope = request.scope
        target = guest_target(scope.get("raw_path"), path, scope.get("query_string", b""))
        relay = await relay_request(request, opened.forward, target, prefix)
    except BaseException:
        opened.release()
        raise
    return RelayResponse(relay, api_response_headers(relay.headers, port=port, prefix=prefix), opened.release)


async def relay_request(request: Request, forward: Forward, target: bytes, prefix: str) -> Relay:
    """Send the request on to the guest; its answer (status and headers, the body to come), or the API error
    saying why not. The connection is closed on failure."""
    port = forward.port
    length = request.headers.get("content-length")
    # a body with Transfer-Encoding (the server de-chunked it) goes on chunked, whatever length came with it
    chunked = "transfer-encoding" in request.headers
    headers = request_headers(
        request.scope["headers"],
        port=port,
        client=request.client.host if request.client else None,
        scheme=request.url.scheme,
        prefix=prefix,
        chunked=chunked,
    )
    content = _body(request) if chunked or (length is not None and length != "0") else None
    try:
        return await forward.send(request.method, target, headers, content, READ_TIMEOUT)
    except ClientDisconnect:
        await forward.aclose()
        raise BadRequest("The client left before its request was sent") from None  # nobody reads it
    except (httpcore.LocalProtocolError, h11.LocalProtocolError) as exc:  # HTTP/1.1 cannot carry it as is
        await forward.aclose()
        raise BadRequest(f"The request cannot be forwarded: {exc}") from None
    except httpcore.TimeoutException:
        await forward.aclose()
        raise UpstreamTimeout(f"The server on port {port} inside the VM did not answer in time") from None
    except (httpcore.NetworkError, httpcore.RemoteProtocolError) as exc:
        await forward.aclose()
        raise UpstreamUnreachable(f"The server on port {port} inside the VM failed: {exc}") from None
    except BaseException:
        await forward.aclose()
        raise


@router.api_route("/{vm_id}/proxy/{port}", methods=METHODS, include_in_schema=False)
async def proxy_root(request: Request, vm_id: VmId, port: Port) -> Response:
    """The guest's root needs the trailing slash (relative links resolve against it)."""
    url = request.url.replace(path=request.url.path + "/")
    return RedirectResponse(str(url), status_code=307)


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


class RelayResponse(StreamingResponse):
    """The guest's answer, relayed as it comes; the connection to the guest is closed when the answer ends,
    fails or the client goes away."""

    def __init__(self, relay: Relay, headers: Headers, release: Callable[[], None]) -> None:
        super().__init__(relay.body(), status_code=relay.status)
        self.raw_headers = headers
        self.relay = relay
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.relay.aclose()
            finally:
                self.release()


# ---- tickets for the proxy's own origin -------------------------------------------------------------------


class ProxyTicketIn(schemas.Request):
    port: int = Field(ge=1, le=65535, description="A TCP port inside the VM (1-65535)")
    path: str = Field(
        default="/", max_length=4096, description="The path (and query) to open on the guest's server"
    )


class ProxyTicketOut(schemas.Response):
    url: str = Field(description="Open this in a browser, within `expires_in` seconds, once")
    origin: str = Field(description="The origin the VM's port is served at (its own, not the API's)")
    expires_in: int = Field(description="Seconds the ticket is valid for")


def origin_url(st: AppState, vm_id: str, port: int) -> str:
    """The proxy origin of a VM's port, as browsers reach it."""
    cfg = st.settings
    public = cfg.proxy_public_port or cfg.proxy_port
    default = 443 if cfg.proxy_scheme == "https" else 80
    host = origin_host(vm_id, port, cfg.proxy_domain)
    return f"{cfg.proxy_scheme}://{host}" + ("" if public == default else f":{public}")


def _ticket_path(path: str) -> str:
    """``path`` as the start of a URL on the origin, with the ticket parameter appended."""
    target = "/" + path.lstrip("/")
    if any(not 0x21 <= ord(c) <= 0x7E for c in target) or "#" in target:
        raise InvalidParameter("path: must be printable ASCII without spaces or '#' (escape them as %XX)")
    return target + ("&" if "?" in target else "?") + TICKET_PARAM + "="


@router.post(
    "/{vm_id}/proxy-ticket",
    status_code=201,
    summary="Open a guest port in a browser",
    description=(
        "A URL on the proxy's own origin (`http://<port>-<vm id>.<CORRAL_PROXY_DOMAIN>:<CORRAL_PROXY_PORT>`, "
        "one origin per VM and port, never the API's) carrying a one-time ticket valid for 60 s. Opening it "
        "sets an HttpOnly, host-only cookie for that VM and port only (`CORRAL_PROXY_SESSION_TTL`, 1 hour by "
        "default; it ends when the API key that asked for the ticket is revoked) and redirects to the same "
        "URL without the ticket. Neither the ticket nor the cookie can call the API, and the API key is "
        "never in the URL. 409 `vm_not_running` when the VM does not run."
    ),
    responses=errors(*AUTHED, 404, 409, 422, 503),
)
def create_proxy_ticket(vm_id: VmId, body: ProxyTicketIn, who: PrincipalDep, st: StateDep) -> ProxyTicketOut:
    start = _ticket_path(body.path)
    lifecycle_of(st).running_container(who.user_id, vm_id)  # the caller's VM (404 otherwise), running
    book = tickets_of(st)
    ticket = book.issue(who.user_id, who.key_id, vm_id, body.port)
    origin = origin_url(st, vm_id, body.port)
    return ProxyTicketOut(url=origin + start + ticket, origin=origin, expires_in=int(book.ticket_ttl))


# ---- WebSocket ----------------------------------------------------------------------------------------------


@router.websocket("/{vm_id}/proxy/{port}/{path:path}")
async def proxy_websocket(websocket: WebSocket, vm_id: str, port: str, path: str) -> None:
    st = connection_state(websocket)
    try:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InvalidParameter("port: must be an integer from 1 to 65535")
        opened = await _open_guest(websocket, st, vm_id, int(port))
    except CorralError as exc:
        await deny(websocket, error_response(exc.status, exc.code, exc.message))
        return
    try:
        scope = websocket.scope
        target = guest_target(scope.get("raw_path"), path, scope.get("query_string", b""))
        prefix = proxy_prefix(vm_id, int(port))
        await relay_websocket(
            websocket,
            opened.forward,
            target,
            prefix,
            lambda raw: api_response_headers(raw, port=int(port), prefix=prefix),
        )
    finally:
        opened.release()


async def relay_websocket(
    websocket: WebSocket,
    forward: Forward,
    target: bytes,
    prefix: str,
    answer_headers: Callable[[Headers], Headers],
) -> None:
    """Open the WebSocket with the guest on ``forward``'s socket and relay it; the guest's HTTP answer
    instead (its headers through ``answer_headers``), or the API error, when it refuses."""
    port = forward.port
    scope = websocket.scope
    uri = f"ws://{GUEST_HOST}:{port}{target.decode('latin-1')}"
    extra = websocket_headers(
        scope["headers"],
        client=websocket.client.host if websocket.client else None,
        scheme=websocket.url.scheme,
        prefix=prefix,
    )
    origin = websocket.headers.get("origin")
    offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    try:
        upstream = await connect(
            uri,
            sock=forward.detach(),
            additional_headers=extra,
            subprotocols=offered or None,  # type: ignore[arg-type]
            origin=origin,  # type: ignore[arg-type]
            max_size=WS_MAX_MESSAGE,
            open_timeout=CONNECT_TIMEOUT,
            compression=None,
            proxy=None,
            user_agent_header=websocket.headers.get("user-agent"),
        )
    except InvalidStatus as exc:  # the guest answered HTTP instead: that answer goes to the client
        await deny(websocket, _guest_answer(exc, answer_headers))
        return
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        failure = UpstreamUnreachable(f"The server on port {port} inside the VM refused the WebSocket: {exc}")
        await deny(websocket, error_response(failure.status, failure.code, failure.message))
        return
    async with upstream:
        await websocket.accept(subprotocol=upstream.subprotocol)
        await _pump(websocket, upstream)


def _guest_answer(refusal: InvalidStatus, answer_headers: Callable[[Headers], Headers]) -> Response:
    """The HTTP answer a guest gave instead of accepting a WebSocket, for the client."""
    answer = refusal.response
    body = bytes(answer.body or b"")
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.raw_items()]
    kept = [(k, v) for k, v in answer_headers(raw) if k in _DENIAL_HEADERS]
    denial = Response(body, status_code=answer.status_code)
    denial.raw_headers = [*kept, (b"content-length", str(len(body)).encode())]
    return denial


async def deny(websocket: WebSocket, response: Response) -> None:
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # the server cannot answer HTTP on a WebSocket request: close with 4000 + status
        await websocket.close(code=4000 + response.status_code)


async def _pump(websocket: WebSocket, upstream: ClientConnection) -> None:
    """Relay frames both ways until one side closes; the other side gets its close code."""

    async def to_guest() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                code = int(message.get("code", 1000))
                await upstream.close(
                    sendable_close_code(code, abnormal=1001), str(message.get("reason") or "")
                )
                return
            if message.get("bytes") is not None:
                await upstream.send(message["bytes"])
            elif message.get("text") is not None:
                await upstream.send(message["text"])

    async def to_client() -> None:
        try:
            async for frame in upstream:
                if isinstance(frame, bytes):
                    await websocket.send_bytes(frame)
                else:
                    await websocket.send_text(frame)
        except ConnectionClosed:
            pass
        code = upstream.close_code if upstream.close_code is not None else 1006
        reason = upstream.close_reason or ""
        with contextlib.suppress(RuntimeError, OSError):
            await websocket.close(sendable_close_code(code, abnormal=1011), reason)

    tasks = [asyncio.create_task(to_guest()), asyncio.create_task(to_client())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if tasks[0] in done and tasks[1] not in done:
            # the client left: wait for the guest's close handshake (bounded by the library's timeout)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(tasks[1]), timeout=5)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
