"""Getting into a VM: ``GET /v1/vms/{id}/ssh`` (iron.sh), and the WebSockets ``/terminal`` (a terminal) and
``/shell`` (a long-lived bash, one command after another) from isorun."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from corral.api.bulkheads import Bulkheads, session_scopes
from corral.api.deps import AppState, PrincipalDep, StateDep, authenticate_connection, connection_state
from corral.api.errors import error_response
from corral.api.routers.common import AUTHED, errors
from corral.api.routers.vms import lifecycle_of
from corral.api.schemas import SshOut
from corral.domain.bulkhead import Bulkhead, Scope
from corral.domain.errors import Conflict, CorralError, RateLimited, ValidationFailed
from corral.node.interactive import Pty, Session
from corral.services import vms as vms_service
from corral.services.access import Access
from corral.services.lifecycle import NodeUnavailable
from corral.services.shell import BASH, BashSession, Done
from corral.ssh.gateway import DRAIN_S, SHELL, Target

router = APIRouter(prefix="/v1/vms", tags=["access"])
VmId = Annotated[str, Path(description="The VM ID")]

SHELL_TIMEOUT_S = 60.0
MAX_SHELL_TIMEOUT_S = 3600.0
MAX_MESSAGE = 1024 * 1024


class SshUnavailable(CorralError):
    status = 503
    code = "ssh_unavailable"


@router.get(
    "/{vm_id}/ssh",
    response_model=SshOut,
    summary="Get SSH connection info",
    description="How to log into the VM with a stock OpenSSH client and the private key of its `public_key`: "
    "the user name is the VM's id (you are root inside). `host_key` is the gateway's host key, for "
    "`known_hosts`. Shell, commands, `scp`/`sftp` and `ssh -L` to ports inside the VM work.",
    responses=errors(*AUTHED, 404),
)
def ssh_info(vm_id: VmId, who: PrincipalDep, st: StateDep, request: Request) -> SshOut:
    lifecycle_of(st)
    with (st.reads or st.sessions)() as session:
        vms_service.get_vm(session, who.user_id, vm_id)
    if st.ssh is None:
        raise SshUnavailable("The SSH gateway is off on this server (CORRAL_SSH=off)")
    host = st.settings.ssh_public_host or request.url.hostname or "127.0.0.1"
    port = st.ssh.port
    username = vm_id
    where = f"{username}@{host}" if ":" not in host else f"{username}@[{host}]"
    command = f"ssh {where}" if port == 22 else f"ssh -p {port} {where}"
    return SshOut(host=host, port=port, username=username, command=command, host_key=st.ssh.public_key)


# ---- WebSockets ---------------------------------------------------------------------------------------------


class _Opened:
    """A caller's running VM and the session slot taken for it (given back by ``release``, once)."""

    def __init__(self, access: Access, target: Target, sessions: Bulkhead, scopes: list[Scope]) -> None:
        self.access, self.target = access, target
        self._sessions: Bulkhead | None = sessions
        self._scopes = scopes

    def release(self) -> None:
        if self._sessions is not None:
            self._sessions.release(self._scopes)
            self._sessions = None


def _bulkheads(st: AppState) -> Bulkheads:
    if st.bulkheads is None:
        st.bulkheads = Bulkheads.from_settings(st.settings)
    return st.bulkheads


async def _open(websocket: WebSocket, vm_id: str) -> _Opened | None:
    """Authenticate (header or ?token=), take a session slot (per key, per VM: 429 ``too_many_concurrent``
    beyond them) and find the caller's running VM, answering an HTTP error in the envelope (before the
    WebSocket is accepted) when that fails. The caller releases the slot when the session ends."""
    st = connection_state(websocket)
    try:
        who = await run_in_threadpool(authenticate_connection, websocket, st, allow_query=True)
        if st.lifecycle is None:
            raise NodeUnavailable("This server runs no sandboxes (CORRAL_NODE=off)")
        access = Access(st.lifecycle, st.reads or st.sessions)
        sessions, scopes = _bulkheads(st).sessions, session_scopes(who.key_id, who.user_id, vm_id)
        sessions.acquire(scopes)
    except CorralError as exc:
        await _deny(websocket, exc)
        return None
    opened = _Opened(access, Target(vm_id, who.user_id, ""), sessions, scopes)
    try:
        opened.target = await run_in_threadpool(access.target, who.user_id, vm_id)
    except BaseException as exc:
        opened.release()
        if isinstance(exc, CorralError):
            await _deny(websocket, exc)
            return None
        raise
    return opened


async def _deny(websocket: WebSocket, exc: CorralError) -> None:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
    try:
        await websocket.send_denial_response(error_response(exc.status, exc.code, exc.message, headers))
    except RuntimeError:  # the server cannot answer HTTP on a WebSocket request: close with 4000 + status
        await websocket.close(code=4000 + exc.status, reason=exc.message[:120])


def _int_param(websocket: WebSocket, name: str, default: int) -> int:
    raw = websocket.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 10000:
        raise ValidationFailed(f"{name} must be an integer from 1 to 10000")
    return int(raw)


_BAD_CONTROL = {
    "type": "error",
    "code": "validation_error",
    "message": 'control messages: {"type": "resize", "cols": 1-10000, "rows": 1-10000} or '
    '{"type": "input", "data": "text"}',
}


def _size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10000


def _control(message: str) -> dict[str, Any] | None:
    """A text frame that is a JSON object with a ``type`` is a control message; other text is input."""
    if not message.startswith("{"):
        return None
    try:
        parsed = json.loads(message)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) and isinstance(parsed.get("type"), str) else None


@router.websocket("/{vm_id}/terminal")
async def terminal(websocket: WebSocket, vm_id: str) -> None:
    """A terminal on the VM: binary frames are its output and your keystrokes; text frames carry JSON control
    messages (``{"type": "resize", "cols": 120, "rows": 40}``, ``{"type": "input", "data": "ls\\n"}``); the
    end is ``{"type": "exit", "exit_code": N}`` and a normal close. Query: ``cols``, ``rows``, ``token``."""
    try:
        cols, rows = _int_param(websocket, "cols", 80), _int_param(websocket, "rows", 24)
    except CorralError as exc:
        await _deny(websocket, exc)
        return
    opened = await _open(websocket, vm_id)
    if opened is None:
        return
    try:
        await _terminal(websocket, opened.access, opened.target, cols, rows)
    finally:
        opened.release()


async def _terminal(websocket: WebSocket, access: Access, target: Target, cols: int, rows: int) -> None:
    try:
        session = await access.start(target, ["/bin/sh", "-c", SHELL], {}, Pty(cols, rows, "xterm-256color"))
    except Exception as exc:
        await _deny(websocket, _unavailable(exc))
        return
    await websocket.accept()
    reader = asyncio.create_task(_terminal_input(websocket, session))
    writer = asyncio.create_task(_terminal_output(websocket, session))
    exited = asyncio.ensure_future(session.wait())
    try:
        await asyncio.wait({exited, reader}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done() and not reader.done():
            # what the shell wrote last, even if a background process keeps the terminal open
            await asyncio.wait({writer}, timeout=DRAIN_S)
            await websocket.send_text(json.dumps({"type": "exit", "exit_code": exited.result()}))
            await websocket.close(1000)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        for task in (reader, writer):
            task.cancel()
        exited.cancel()
        await session.close()


async def _terminal_output(websocket: WebSocket, session: Session) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while data := await session.read("stdout"):
            await websocket.send_bytes(data)


def _unavailable(exc: Exception) -> CorralError:
    if isinstance(exc, CorralError):
        return exc
    return Conflict(f"cannot start a session in the VM: {exc}", code="vm_not_running")


async def _terminal_input(websocket: WebSocket, session: Session) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("bytes") is not None:
                await session.write(message["bytes"])
                continue
            text = message.get("text") or ""
            control = _control(text)
            if control is None:
                await session.write(text.encode())
            elif control["type"] == "resize" and _size(control.get("cols")) and _size(control.get("rows")):
                session.resize(control["cols"], control["rows"])
            elif control["type"] == "input" and isinstance(control.get("data"), str):
                await session.write(control["data"].encode())
            else:
                await websocket.send_text(json.dumps(_BAD_CONTROL))
    # the client went away: the session is closed (what runs is ended) by the handler


@router.websocket("/{vm_id}/shell")
async def shell(websocket: WebSocket, vm_id: str) -> None:
    """A long-lived bash: send ``{"command": "cd /tmp", "timeout": 30}`` (or the command as plain text), get
    ``{"type": "stdout"|"stderr", "data": ...}`` messages and then ``{"type": "exit", "exit_code": N,
    "duration_ms": N}``. The directory, variables and functions carry over from one command to the next."""
    opened = await _open(websocket, vm_id)
    if opened is None:
        return
    try:
        await _shell(websocket, opened.access, opened.target)
    finally:
        opened.release()


async def _shell(websocket: WebSocket, access: Access, target: Target) -> None:
    bash = BashSession(lambda: access.start(target, BASH, {}, None))
    try:
        await bash.open()
    except Exception as exc:
        await _deny(websocket, _unavailable(exc))
        return
    await websocket.accept()
    try:
        await websocket.send_json({"type": "ready", "shell": BASH[0]})
        while True:
            text = await websocket.receive_text()
            try:
                command, timeout = _shell_request(text)
            except CorralError as exc:
                await websocket.send_json({"type": "error", "code": exc.code, "message": exc.message})
                continue
            async for item in bash.run(command, timeout):
                if isinstance(item, Done):
                    await websocket.send_json(
                        {
                            "type": "exit",
                            "exit_code": item.exit_code,
                            "duration_ms": item.duration_ms,
                            "timed_out": item.timed_out,
                            "shell_restarted": item.timed_out or item.shell_exited,
                        }
                    )
                else:
                    await websocket.send_json(
                        {"type": item.stream, "data": item.data.decode(errors="replace")}
                    )
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        await bash.close()


def _shell_request(text: str) -> tuple[str, float]:
    """A command for the shell: plain text, or ``{"command": ..., "timeout": seconds}``."""
    if len(text) > MAX_MESSAGE:
        raise ValidationFailed("a command is at most 1 MiB")
    command, timeout = text, SHELL_TIMEOUT_S
    if text.startswith("{"):
        try:
            request = json.loads(text)
        except ValueError:
            raise ValidationFailed("a message starting with { must be a JSON object") from None
        if not isinstance(request, dict):
            raise ValidationFailed("a message starting with { must be a JSON object")
        raw_command, raw_timeout = request.get("command"), request.get("timeout", SHELL_TIMEOUT_S)
        if not isinstance(raw_command, str):
            raise ValidationFailed("command must be a string")
        if not isinstance(raw_timeout, (int, float)) or isinstance(raw_timeout, bool):
            raise ValidationFailed("timeout must be a number of seconds")
        command, timeout = raw_command, float(raw_timeout)
        if not 0 < timeout <= MAX_SHELL_TIMEOUT_S:
            raise ValidationFailed(f"timeout must be more than 0 and at most {int(MAX_SHELL_TIMEOUT_S)} s")
    if not command.strip():
        raise ValidationFailed("command must not be empty")
    if "\x00" in command:
        raise ValidationFailed("command must not contain NUL")
    return command, timeout
