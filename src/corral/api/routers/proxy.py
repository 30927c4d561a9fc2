"""``/v1/vms/{vm_id}/proxy/{port}/{path}``: HTTP and WebSocket to a server listening inside the caller's VM
(isorun's "Reverse-proxy a guest port").

The server connects from the host into the sandbox's network namespace (``corral.node.guestnet``), so a
server bound to 127.0.0.1 inside is reached; nothing of the sandbox is published on the host. Bodies are
streamed both ways (an upload is never held in memory, a download is relayed as the guest sends it). How
requests and answers are rewritten is in ``corral.api.proxy_headers``, the HTTP/1.1 exchange with the guest in
``corral.api.guest_http``."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from typing import Annotated

import httpcore
from fastapi import APIRouter, Path, Request, WebSocket
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from corral.api.deps import AppState, authenticate_connection, connection_state
from corral.api.errors import error_response
from corral.api.guest_http import Forward, Relay
from corral.api.proxy_headers import (
    GUEST_HOST,
    WS_MAX_MESSAGE,
    Headers,
    guest_target,
    proxy_prefix,
    request_headers,
    response_headers,
    sendable_close_code,
    websocket_headers,
)
from corral.api.routers.common import AUTHED, errors
from corral.api.routers.vms import lifecycle_of
from corral.domain.errors import BadRequest, Conflict, CorralError, InvalidParameter
from corral.node.guestnet import GuestUnreachable, SandboxDialer, SandboxGone
from corral.services.lifecycle import Lifecycle

router = APIRouter(prefix="/v1/vms", tags=["proxy"])
VmId = Annotated[str, Path(description="The VM ID")]
Port = Annotated[int, Path(description="A TCP port inside the VM (1-65535)", ge=1, le=65535)]
GuestPath = Annotated[str, Path(description="The path on the guest's server (may be empty)")]

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 300.0  # between two reads from the guest (its answer's head included)
_DENIAL_HEADERS = (b"content-type", b"location", b"www-authenticate", b"set-cookie")
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
DESCRIPTION = (
    "Forwards the request to `http://127.0.0.1:{port}/{path}` inside the VM, as HTTP/1.1, and relays the "
    "guest's answer (status, headers, body) as it comes. Every method works (GET, POST, PUT, PATCH, DELETE, "
    "HEAD, OPTIONS), and a WebSocket on the same path is relayed to the guest. Auth by `Authorization: "
    "Bearer` or `?token=` (the `token` query parameter is never forwarded, nor the `Authorization` header). "
    "Bodies are streamed both ways, of any size. 502 `upstream_unreachable` when nothing listens on the port, "
    "504 `upstream_timeout` when the guest does not answer within 300 s."
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


def dialer_of(st: AppState) -> SandboxDialer:
    """The app's dialer into sandboxes (one per lifecycle, made on first use)."""
    life = lifecycle_of(st)
    dialer = _dialers.get(life)
    if dialer is None:
        dialer = _dialers.setdefault(life, SandboxDialer(life.node.pid))
    return dialer


def _open_guest(conn: HTTPConnection, st: AppState, vm_id: str, port: int) -> Forward:
    """The caller (header or ``?token=``), their running VM, and a socket connected to ``port`` inside it, or
    the API error saying why not. Blocking: all of it runs in one worker thread."""
    who = authenticate_connection(conn, st, allow_query=True)
    life = lifecycle_of(st)
    cid = life.running_container(who.user_id, vm_id)
    try:
        sock = dialer_of(st).connect(cid, GUEST_HOST, port, CONNECT_TIMEOUT)
    except SandboxGone:
        raise Conflict("VM is not running", code="vm_not_running") from None
    except GuestUnreachable:
        raise UpstreamUnreachable(f"Nothing accepts connections on port {port} inside the VM") from None
    return Forward(sock, port)


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
    forward = await run_in_threadpool(_open_guest, request, connection_state(request), vm_id, port)
    prefix = proxy_prefix(vm_id, port)
    scope = request.scope
    length = request.headers.get("content-length")
    chunked = length is None and "transfer-encoding" in request.headers
    headers = request_headers(
        scope["headers"],
        port=port,
        client=request.client.host if request.client else None,
        scheme=request.url.scheme,
        prefix=prefix,
        chunked=chunked,
    )
    content = _body(request) if chunked or (length is not None and length != "0") else None
    target = guest_target(scope.get("raw_path"), path, scope.get("query_string", b""))
    try:
        relay = await forward.send(request.method, target, headers, content, READ_TIMEOUT)
    except ClientDisconnect:
        await forward.aclose()
        return Response(status_code=400)  # nobody is left to read it
    except httpcore.LocalProtocolError as exc:  # a request HTTP/1.1 cannot carry as it is
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
    return _RelayResponse(relay, response_headers(relay.headers, port=port, prefix=prefix))


@router.api_route("/{vm_id}/proxy/{port}", methods=METHODS, include_in_schema=False)
async def proxy_root(request: Request, vm_id: VmId, port: Port) -> Response:
    """The guest's root needs the trailing slash (relative links resolve against it)."""
    url = request.url.replace(path=request.url.path + "/")
    return RedirectResponse(str(url), status_code=307)


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


class _RelayResponse(StreamingResponse):
    """The guest's answer, relayed as it comes; the connection to the guest is closed when the answer ends,
    fails or the client goes away."""

    def __init__(self, relay: Relay, headers: Headers) -> None:
        super().__init__(relay.body(), status_code=relay.status)
        self.raw_headers = headers
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.relay.aclose()


# ---- WebSocket ----------------------------------------------------------------------------------------------


@router.websocket("/{vm_id}/proxy/{port}/{path:path}")
async def proxy_websocket(websocket: WebSocket, vm_id: str, port: str, path: str) -> None:
    st = connection_state(websocket)
    try:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InvalidParameter("port: must be an integer from 1 to 65535")
        forward = await run_in_threadpool(_open_guest, websocket, st, vm_id, int(port))
    except CorralError as exc:
        await _deny(websocket, error_response(exc.status, exc.code, exc.message))
        return
    scope = websocket.scope
    target = guest_target(scope.get("raw_path"), path, scope.get("query_string", b""))
    uri = f"ws://{GUEST_HOST}:{port}{target.decode('latin-1')}"
    extra = websocket_headers(
        scope["headers"],
        client=websocket.client.host if websocket.client else None,
        scheme=websocket.url.scheme,
        prefix=proxy_prefix(vm_id, int(port)),
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
        denial = _guest_answer(exc, int(port), proxy_prefix(vm_id, int(port)))
        await _deny(websocket, denial)
        return
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        failure = UpstreamUnreachable(f"The server on port {port} inside the VM refused the WebSocket: {exc}")
        await _deny(websocket, error_response(failure.status, failure.code, failure.message))
        return
    async with upstream:
        await websocket.accept(subprotocol=upstream.subprotocol)
        await _pump(websocket, upstream)


def _guest_answer(refusal: InvalidStatus, port: int, prefix: str) -> Response:
    """The HTTP answer a guest gave instead of accepting a WebSocket, for the client."""
    answer = refusal.response
    body = bytes(answer.body or b"")
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.raw_items()]
    kept = [(k, v) for k, v in response_headers(raw, port=port, prefix=prefix) if k in _DENIAL_HEADERS]
    denial = Response(body, status_code=answer.status_code)
    denial.raw_headers = [*kept, (b"content-length", str(len(body)).encode())]
    return denial


async def _deny(websocket: WebSocket, response: Response) -> None:
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
