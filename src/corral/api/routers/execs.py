"""Running commands in a VM: ``/v1/vms/{vm_id}/exec`` and ``/exec/stream`` (isorun's paths).

Both are awaited on the event loop (the command's output comes over an asyncio connection to the sandbox's
command server): a command that runs for an hour holds no worker thread. Each counts against the exec caps
(per API key, per VM, on the server; 429 ``too_many_concurrent`` beyond them), and ends when its client goes
away: the JSON exec watches the connection for the disconnect, the stream is cancelled with it."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from corral.api.bulkheads import Bulkheads, exec_scopes
from corral.api.deps import AppState, PrincipalDep, StateDep
from corral.api.routers.common import AUTHED, errors
from corral.api.routers.vms import lifecycle_of
from corral.api.schemas import ExecOut, ExecRequest
from corral.domain import validation
from corral.domain.errors import (
    Conflict,
    ValidationFailed,
)
from corral.node.execution import Exit, Output, shell_argv
from corral.node.files import FileError, resolve_user
from corral.node.local import NodeError
from corral.services.access import command_env
from corral.services.lifecycle import Lifecycle

router = APIRouter(prefix="/v1/vms", tags=["exec and files"])
VmId = Annotated[str, Path(description="The VM ID")]
FilePath = Annotated[str, Query(description="Absolute path inside the sandbox", max_length=4096)]

OUTPUT_CAP = 1024 * 1024  # per stream, in the JSON answer of /exec
_MAX_ARGS = 4096
_MAX_COMMAND = 256 * 1024


def _validated(body: ExecRequest) -> list[str]:
    args = shell_argv(body.command)
    if not args or not args[0]:
        raise ValidationFailed("command must not be empty")
    if len(args) > _MAX_ARGS or sum(len(a) for a in args) > _MAX_COMMAND:
        raise ValidationFailed("command is too long")
    for key, value in body.env.items():
        try:
            validation.env_key(key)
        except ValueError as exc:
            raise ValidationFailed(f"env: {exc}") from None
        if len(value) > 32768:
            raise ValidationFailed(f"env: the value of {key} is over 32 KiB")
    if body.cwd is not None and not body.cwd.startswith("/"):
        raise ValidationFailed("cwd must be an absolute path")
    return args


class _Prepared:
    def __init__(
        self, life: Lifecycle, cid: str, args: list[str], env: dict[str, str], body: ExecRequest
    ) -> None:
        self.life, self.cid, self.args, self.env, self.body = life, cid, args, env, body
        self.user: str | None = None

    def events(self) -> AsyncIterator[Output | Exit]:
        return self.life.node.run_async(
            self.cid,
            self.args,
            env=self.env,
            cwd=self.body.cwd or "/root",
            user=self.user,
            timeout=self.body.timeout,
        )


def _prepare(st: AppState, user_id: str, vm_id: str, body: ExecRequest) -> _Prepared:
    """What the command needs from the store and the sandbox (blocking: run in a worker thread)."""
    life = lifecycle_of(st)
    args = _validated(body)
    with (st.reads or st.sessions)() as session:
        cid = life.running_container(user_id, vm_id, session)
        env = {**command_env(session, user_id), **body.env}
    prepared = _Prepared(life, cid, args, env, body)
    if body.user is not None:
        try:
            prepared.user = resolve_user(life.node.files(cid), body.user)
        except FileError as exc:
            raise ValidationFailed(f"user: {exc}") from None
        except NodeError:
            raise Conflict("VM is not running", code="vm_not_running") from None
    return prepared


def _bulkheads(st: AppState) -> Bulkheads:
    if st.bulkheads is None:
        st.bulkheads = Bulkheads.from_settings(st.settings)
    return st.bulkheads


async def _client_gone(receive: Receive) -> None:
    """Returns when the client has closed its connection (the request's body is already read, so the next
    message of the ASGI receive channel is the disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # not expected after the body; never a busy loop


async def _collect(events: AsyncIterator[Output | Exit]) -> ExecOut:
    out = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = {"stdout": False, "stderr": False}
    result = Exit(-1, False, 0)
    async for event in events:
        if isinstance(event, Output):
            buf = out[event.stream]
            room = OUTPUT_CAP - len(buf)
            if len(event.data) > room:
                truncated[event.stream] = True
            buf += event.data[: max(room, 0)]
        else:
            result = event
    return ExecOut(
        exit_code=result.exit_code,
        stdout=out["stdout"].decode(errors="replace"),
        stderr=out["stderr"].decode(errors="replace"),
        stdout_truncated=truncated["stdout"],
        stderr_truncated=truncated["stderr"],
        timed_out=result.timed_out,
        duration_ms=result.duration_ms,
    )


CLIENT_CLOSED = 499  # never seen by anyone: the client is gone


@router.post(
    "/{vm_id}/exec",
    response_model=ExecOut,
    summary="Run a command",
    description="Runs the command to completion and answers its exit code and output. stdout and stderr are "
    "each capped at 1 MiB here (the `*_truncated` flags say when); use /exec/stream for more. Your /v1/env "
    "variables are in its environment. On timeout the whole process tree is killed and exit_code is 124; "
    "closing the connection before the end kills it too. An API key may run 32 commands at once and a VM 16 "
    "(by default; exec and exec/stream together): beyond that, 429 `too_many_concurrent` with `Retry-After`.",
    responses=errors(*AUTHED, 404, 409, 422),
)
async def exec_command(
    vm_id: VmId, body: ExecRequest, who: PrincipalDep, st: StateDep, request: Request
) -> Any:
    with _bulkheads(st).execs.slot(exec_scopes(who.key_id, who.user_id, vm_id)):
        prepared = await run_in_threadpool(_prepare, st, who.user_id, vm_id, body)
        collect = asyncio.ensure_future(_collect(prepared.events()))
        gone = asyncio.ensure_future(_client_gone(request.receive))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (collect, gone):
                task.cancel()  # a finished task ignores it; an unfinished command is killed
            with contextlib.suppress(asyncio.CancelledError):
                await collect
        if collect.cancelled():
            return Response(status_code=CLIENT_CLOSED)
        return collect.result()


def _sse(event: str, data: dict[str, object]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class _SlotStream(StreamingResponse):
    """A stream that gives its exec slot back when it ends, however it ends (its body may never start when the
    client leaves at once)."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _stream(prepared: _Prepared) -> AsyncIterator[bytes]:
    decoders = {s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in ("stdout", "stderr")}
    events = prepared.events()
    try:
        async for event in events:
            if isinstance(event, Output):
                text = decoders[event.stream].decode(event.data)
                if text:
                    yield _sse(event.stream, {"data": text})
            else:
                for name, dec in decoders.items():
                    tail = dec.decode(b"", final=True)
                    if tail:
                        yield _sse(name, {"data": tail})
                yield _sse(
                    "exit",
                    {
                        "exit_code": event.exit_code,
                        "timed_out": event.timed_out,
                        "duration_ms": event.duration_ms,
                    },
                )
    finally:
        await events.aclose()  # type: ignore[attr-defined]  # the command is killed if it still runs


@router.post(
    "/{vm_id}/exec/stream",
    summary="Run a command, streaming its output",
    description='Server-Sent Events as the process writes: `stdout` and `stderr` events (`{"data": text}`), '
    'then one `exit` event (`{"exit_code", "timed_out", "duration_ms"}`). No output cap. Closing the '
    "connection kills the command's process tree. Counts against the same caps as /exec (429 "
    "`too_many_concurrent`).",
    responses={200: {"content": {"text/event-stream": {}}}, **errors(*AUTHED, 404, 409, 422)},
)
async def exec_stream(vm_id: VmId, body: ExecRequest, who: PrincipalDep, st: StateDep) -> StreamingResponse:
    execs = _bulkheads(st).execs
    scopes = exec_scopes(who.key_id, who.user_id, vm_id)
    execs.acquire(scopes)
    try:
        prepared = await run_in_threadpool(_prepare, st, who.user_id, vm_id, body)
    except BaseException:
        execs.release(scopes)
        raise
    return _SlotStream(
        _stream(prepared),
        lambda: execs.release(scopes),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
