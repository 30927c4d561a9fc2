"""One HTTP/1.1 exchange with a server inside a sandbox, over a socket already connected in its network
namespace (``corral.node.guestnet``): httpcore's HTTP/1.1 connection (h11) on that socket, the request body
streamed to the guest and the answer's body streamed back. One connection per request: it is closed when
the answer has been relayed, so nothing is held open into a sandbox that stops."""

from __future__ import annotations

import contextlib
import socket
import ssl
import weakref
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import anyio
import anyio.abc
import httpcore

from corral.api.proxy_headers import GUEST_HOST, Headers


class _SocketStream(httpcore.AsyncNetworkStream):
    """httpcore's view of an anyio socket stream (what its own anyio backend does, for a socket we made)."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self._stream = stream

    # the signatures are httpcore's (hence ``timeout`` parameters on async methods)
    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        try:
            with anyio.fail_after(timeout):
                return await self._stream.receive(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("the guest sent nothing in time") from None
        except anyio.EndOfStream:
            return b""
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        try:
            with anyio.fail_after(timeout):
                await self._stream.send(buffer)
        except TimeoutError:
            raise httpcore.WriteTimeout("the guest took nothing in time") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from None

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("TLS is not spoken to guests")

    def get_extra_info(self, info: str) -> Any:
        return None  # httpcore asks for "socket" to check a kept-alive connection; none is kept here


class Relay:
    """The guest's answer: status and headers now, the body as it comes."""

    def __init__(self, connection: httpcore.AsyncHTTP11Connection, response: httpcore.Response) -> None:
        self._connection = connection
        self._response = response
        self.status = response.status
        self.headers: Headers = list(response.headers)

    async def body(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.aiter_stream():
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            await self._connection.aclose()


_LIVE: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # every socket to a guest not yet collected


def abort_guest_connections() -> int:
    """Cut every open connection to a guest (the server is stopping): a request still waiting for a guest
    that never answers then ends at once (502) instead of holding the shutdown up to its read timeout.
    Returns how many were cut."""
    cut = 0
    for sock in list(_LIVE):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
            cut += 1
    return cut


class Forward:
    """A socket connected to a guest's server, for one request (``send``) or handed to a WebSocket client
    (``detach``)."""

    def __init__(self, sock: socket.socket, port: int) -> None:
        self._sock: socket.socket | None = sock
        self.port = port
        _LIVE.add(sock)

    def detach(self) -> socket.socket:
        sock, self._sock = self._sock, None
        if sock is None:
            raise RuntimeError("the socket was already used")
        return sock

    async def send(
        self,
        method: str,
        target: bytes,
        headers: Headers,
        content: AsyncIterable[bytes] | None,
        read_timeout: float,
    ) -> Relay:
        stream = _SocketStream(await anyio.abc.SocketStream.from_socket(self.detach()))
        connection = httpcore.AsyncHTTP11Connection(
            origin=httpcore.Origin(b"http", GUEST_HOST.encode(), self.port), stream=stream
        )
        request = httpcore.Request(
            method.encode(),
            httpcore.URL(scheme=b"http", host=GUEST_HOST.encode(), port=self.port, target=target),
            headers=headers,
            content=content,
            extensions={"timeout": {"read": read_timeout, "write": read_timeout}},
        )
        try:
            response = await connection.handle_async_request(request)
        except BaseException:
            await connection.aclose()
            raise
        return Relay(connection, response)

    async def aclose(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
