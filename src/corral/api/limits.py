"""Checks on the raw request, as ASGI middleware, before any handler or body parser sees it:

- a body over the size limit answers 400 ``request_too_large``, whether it announces its length or is sent
  chunked (a chunked body is read up to the limit first, then handed on);
- except where the body is streamed on, of any size: file uploads (to the sandbox's disk) and the guest port
  proxy (to the server inside the VM);
- a NUL character in the path or the query string answers 400 ``invalid_parameter`` (no database stores it).
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def _send_error(send: Send, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _has_nul(scope: Scope) -> bool:
    query = bytes(scope.get("query_string", b"")).lower()
    return "\x00" in scope.get("path", "") or b"%00" in query or b"\x00" in query


STREAMED_UPLOAD = re.compile(r"/v1/vms/[^/]+/files/upload")
GUEST_PROXY = re.compile(r"/v1/vms/[^/]+/proxy/.*")  # streamed to the server inside the VM, any size


class RequestGuard:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _has_nul(scope):
            await _send_error(send, "invalid_parameter", "The path and query must not contain NUL characters")
            return
        if scope.get("method") == "POST" and STREAMED_UPLOAD.fullmatch(scope.get("path", "")):
            await self.app(scope, receive, send)  # file uploads are streamed to disk, any size
            return
        if GUEST_PROXY.fullmatch(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        length = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        if length is not None:
            if length > self.max_bytes:
                await self._too_large(send)
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length: read the (chunked) body up to the limit before anyone acts on the request.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        buffered: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal buffered
            if buffered is not None:
                message, buffered = buffered, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await _send_error(send, "request_too_large", f"Request body is larger than {self.max_bytes} bytes")
