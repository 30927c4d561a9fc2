"""Running commands in a VM: ``/v1/vms/{vm_id}/exec`` and ``/exec/stream`` (isorun's paths)."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import StreamingResponse

from corral.api.deps import PrincipalDep, StateDep
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

    def events(self) -> Iterator[Output | Exit]:
        return self.life.node.run(
            self.cid,
            self.args,
            env=self.env,
            cwd=self.body.cwd or "/root",
            user=self.user,
            timeout=self.body.timeout,
        )


def _prepare(st: StateDep, user_id: str, vm_id: str, body: ExecRequest) -> _Prepared:
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


@router.post(
    "/{vm_id}/exec",
    response_model=ExecOut,
    summary="Run a command",
    description="Runs the command to completion and answers its exit code and output. stdout and stderr are "
    "each capped at 1 MiB here (the `*_truncated` flags say when); use /exec/stream for more. Your /v1/env "
    "variables are in its environment. On timeout the whole process tree is killed and exit_code is 124.",
    responses=errors(*AUTHED, 404, 409, 422),
)
def exec_command(vm_id: VmId, body: ExecRequest, who: PrincipalDep, st: StateDep) -> ExecOut:
    prepared = _prepare(st, who.user_id, vm_id, body)
    out = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = {"stdout": False, "stderr": False}
    result = Exit(-1, False, 0)
    for event in prepared.events():
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


def _sse(event: str, data: dict[str, object]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@router.post(
    "/{vm_id}/exec/stream",
    summary="Run a command, streaming its output",
    description='Server-Sent Events as the process writes: `stdout` and `stderr` events (`{"data": text}`), '
    'then one `exit` event (`{"exit_code", "timed_out", "duration_ms"}`). No output cap. Closing the '
    "connection kills the command's process tree.",
    responses={200: {"content": {"text/event-stream": {}}}, **errors(*AUTHED, 404, 409, 422)},
)
def exec_stream(vm_id: VmId, body: ExecRequest, who: PrincipalDep, st: StateDep) -> StreamingResponse:
    prepared = _prepare(st, who.user_id, vm_id, body)

    def stream() -> Iterator[bytes]:
        decoders = {s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in ("stdout", "stderr")}
        events = prepared.events()
        try:
            for event in events:
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
            events.close()  # type: ignore[attr-defined]

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
