"""``Idempotency-Key`` on the POSTs that create something, as ASGI middleware in front of the routers.

The key is kept per account (the bearer key's user) for 24 hours with the first answer, which its retries get
back (``Idempotent-Replayed: true``); see ``corral.services.idempotency``. A request without the header, to
another route, or without a valid API key (the route answers 401 itself) passes through untouched.
"""

from __future__ import annotations

import json
import re
from typing import Any

import anyio.to_thread
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.api.deps import AppState
from corral.services import idempotency
from corral.services.idempotency import Claim, Outcome
from corral.services.users import authenticate
from corral.store.db import transaction

HEADER = b"idempotency-key"
# the POSTs that create something
CREATES = re.compile(
    r"/v1/(vms|secrets|egress/rules|api-keys|vms/[^/]+/(snapshots|fork|checkpoints))",
)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def _answer(
    send: Send, status: int, body: bytes, content_type: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, status: int, code: str, message: str, retry_after: int | None = None) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
    extra = [(b"retry-after", str(retry_after).encode())] if retry_after is not None else None
    await _answer(send, status, body, "application/json", extra)


class Idempotency:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or not CREATES.fullmatch(scope.get("path", ""))
            or (key := _header(scope, HEADER)) is None
        ):
            await self.app(scope, receive, send)
            return
        if not idempotency.valid_key(key):
            await _error(
                send,
                400,
                "invalid_parameter",
                f"Idempotency-Key must be 1 to {idempotency.MAX_KEY_CHARS} printable ASCII characters",
            )
            return
        st = scope["app"].state.corral
        assert isinstance(st, AppState)
        user_id = await anyio.to_thread.run_sync(self._user, st, scope)
        if user_id is None:
            await self.app(scope, receive, send)  # the route answers 401
            return
        body, complete = await _read_body(receive)
        if not complete:
            return  # the client went away before its body arrived: nothing to run
        fp = idempotency.fingerprint(
            scope["method"], scope["path"], bytes(scope.get("query_string", b"")), body
        )
        claim: Claim = await anyio.to_thread.run_sync(
            idempotency.claim, st.sessions, st.services.clock.now(), user_id, key, fp
        )
        if claim.outcome is Outcome.REUSED:
            await _error(
                send,
                422,
                "idempotency_key_reuse",
                "This Idempotency-Key was already used for a different request (method, path or body); "
                "use a new key for a new request",
            )
            return
        if claim.outcome is Outcome.IN_USE:
            await _error(
                send,
                409,
                "idempotency_key_in_use",
                "A request with this Idempotency-Key is still running; retry when it has answered",
                retry_after=1,
            )
            return
        if claim.outcome is Outcome.REPLAY:
            await _answer(
                send,
                claim.status or 200,
                claim.body or b"",
                claim.content_type or "application/json",
                [(b"idempotent-replayed", b"true")],
            )
            return
        await self._run(scope, _replay(body, receive), send, st, user_id, key)

    @staticmethod
    def _user(st: AppState, scope: Scope) -> str | None:
        scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        with transaction(st.reads or st.sessions) as session:
            who = authenticate(session, token.strip())
        return None if who is None else who.user_id

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, st: AppState, user_id: str, key: str
    ) -> None:
        """Run the request holding its answer back until it is stored, then send it; an answer too large or
        streamed is sent as it comes and not kept."""
        start: Message | None = None
        chunks: list[bytes] = []
        size = 0
        passing = False  # the answer goes straight through (not kept)

        async def capture(message: Message) -> None:
            nonlocal start, size, passing
            if passing:
                await send(message)
                return
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(bytes(message.get("body", b"")))
            size += len(chunks[-1])
            if not message.get("more_body", False):
                return
            if size > idempotency.MAX_STORED_BYTES:
                passing = True
                assert start is not None
                await send(start)
                await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})

        kept = False
        try:
            await self.app(scope, receive, capture)
            if not passing and start is not None:
                status = int(start["status"])
                content_type = _content_type(start)
                if idempotency.keeps(status) and content_type.startswith("application/json"):
                    await anyio.to_thread.run_sync(
                        idempotency.store, st.sessions, user_id, key, status, content_type, b"".join(chunks)
                    )
                    kept = True
                await send(start)
                await send({"type": "http.response.body", "body": b"".join(chunks)})
        finally:
            if not kept:
                await anyio.to_thread.run_sync(idempotency.release, st.sessions, user_id, key)


def _content_type(start: Message) -> str:
    for name, value in start.get("headers", []):
        if bytes(name).lower() == b"content-type":
            return bytes(value).decode("latin-1").lower()
    return ""


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole body (RequestGuard has capped its size already); False when the client went away."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(parts), False
        parts.append(bytes(message.get("body", b"")))
        if not message.get("more_body", False):
            return b"".join(parts), True


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app: the body already read, then whatever the client sends next (its leaving)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def document(schema: dict[str, Any]) -> None:
    """The ``Idempotency-Key`` header and its answers on the operations that take it (OpenAPI)."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}
    for path, operations in schema.get("paths", {}).items():
        op = operations.get("post")
        if op is None or not CREATES.fullmatch(path):
            continue
        op.setdefault("parameters", []).append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Any unique string (a UUID) to make retries safe: for 24 hours the same key with "
                "the same request gets the first answer again (`Idempotent-Replayed: true`), not a second "
                "resource. The same key with another request: 422 `idempotency_key_reuse`; while the first "
                "still runs: 409 `idempotency_key_in_use`.",
                "schema": {"type": "string", "maxLength": idempotency.MAX_KEY_CHARS},
            }
        )
        responses = op.setdefault("responses", {})
        for status, words in (
            ("400", "Bad request (also a malformed Idempotency-Key)"),
            ("409", "Conflict (also `idempotency_key_in_use`, with Retry-After)"),
            ("422", "Validation error (also `idempotency_key_reuse`)"),
        ):
            responses.setdefault(status, {"description": words, "content": error})
