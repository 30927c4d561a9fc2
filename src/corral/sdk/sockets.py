"""The VM's WebSockets: ``/shell`` (a long-lived bash, one command after another) and ``/terminal`` (a
terminal), over the ``websockets`` library, for both clients. The messages are documented in docs/api.md."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import websockets.asyncio.client
import websockets.sync.client
from websockets.exceptions import InvalidStatus

from corral.sdk.call import Call, Route
from corral.sdk.config import Config
from corral.sdk.errors import APIStatusError, error_for

SHELL = Route("GET", "/v1/vms/{vm_id}/shell")
TERMINAL = Route("GET", "/v1/vms/{vm_id}/terminal")


def _never(_: object) -> None:  # a WebSocket's answer is not parsed as an HTTP one
    raise NotImplementedError


def shell_socket(vm_id: str) -> Call[None]:
    """The shell WebSocket of a VM (``client.vms.shell(vm_id)`` opens it)."""
    return Call(SHELL, _never, {"vm_id": vm_id})


def terminal_socket(vm_id: str, cols: int = 80, rows: int = 24) -> Call[None]:
    """The terminal WebSocket of a VM (``client.vms.terminal(vm_id)`` opens it)."""
    return Call(TERMINAL, _never, {"vm_id": vm_id}, {"cols": cols, "rows": rows})


def socket_url(config: Config, call: Call[Any]) -> str:
    query = "&".join(f"{k}={v}" for k, v in call.query().items())
    url = "ws" + config.base_url.removeprefix("http") + call.path
    return f"{url}?{query}" if query else url


def _refused(exc: InvalidStatus) -> APIStatusError:
    """The HTTP answer the server gave instead of the WebSocket, as the API error it is."""
    response = exc.response
    return error_for(response.status_code, dict(response.headers.raw_items()), bytes(response.body or b""))


@dataclass(frozen=True)
class ShellResult:
    exit_code: int
    stdout: str
    stderr: str
    duration_ms: int
    timed_out: bool
    shell_restarted: bool  # the command timed out or ended the shell: a fresh one runs now
    output: list[tuple[str, str]] = field(default_factory=list)  # (stream, text) in the order received


def _command(command: str, timeout: float | None) -> str:
    return json.dumps({"command": command} if timeout is None else {"command": command, "timeout": timeout})


class _Collect:
    def __init__(self) -> None:
        self.out: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.order: list[tuple[str, str]] = []

    def take(self, raw: str | bytes) -> ShellResult | None:
        message = json.loads(raw)
        kind = message.get("type")
        if kind in ("stdout", "stderr"):
            self.out[kind].append(message["data"])
            self.order.append((kind, message["data"]))
            return None
        if kind == "error":
            raise error_for(422, {}, json.dumps({"error": message}).encode())
        if kind != "exit":
            return None
        return ShellResult(
            exit_code=int(message["exit_code"]),
            stdout="".join(self.out["stdout"]),
            stderr="".join(self.out["stderr"]),
            duration_ms=int(message["duration_ms"]),
            timed_out=bool(message["timed_out"]),
            shell_restarted=bool(message["shell_restarted"]),
            output=self.order,
        )


class Shell:
    """``with client.vms.shell(vm_id) as sh: sh.run("cd /tmp"); sh.run("pwd").stdout == "/tmp\\n"``"""

    def __init__(self, config: Config, vm_id: str, open_timeout: float = 30.0) -> None:
        headers = {"Authorization": config.authorization()}
        try:
            self._ws = websockets.sync.client.connect(
                socket_url(config, shell_socket(vm_id)),
                additional_headers=headers,
                open_timeout=open_timeout,
                legacy=True,  # a connection the caller closes, not a context manager
            )
        except InvalidStatus as exc:
            raise _refused(exc) from None
        json.loads(self._ws.recv(timeout=open_timeout))  # {"type": "ready"}

    def run(self, command: str, timeout: float | None = None) -> ShellResult:
        self._ws.send(_command(command, timeout))
        collect = _Collect()
        while True:
            if (result := collect.take(self._ws.recv())) is not None:
                return result

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class AsyncShell:
    """``async with client.vms.shell(vm_id) as sh: await sh.run("pwd")``"""

    def __init__(self, config: Config, vm_id: str) -> None:
        self._config, self._vm_id = config, vm_id
        self._ws: websockets.asyncio.client.ClientConnection | None = None

    async def open(self) -> Self:
        headers = {"Authorization": self._config.authorization()}
        try:
            self._ws = await websockets.asyncio.client.connect(
                socket_url(self._config, shell_socket(self._vm_id)), additional_headers=headers
            )
        except InvalidStatus as exc:
            raise _refused(exc) from None
        json.loads(await self._ws.recv())
        return self

    async def run(self, command: str, timeout: float | None = None) -> ShellResult:  # noqa: ASYNC109 (the command's, kept by the server)
        assert self._ws is not None, "open() first (or use `async with`)"
        await self._ws.send(_command(command, timeout))
        collect = _Collect()
        while True:
            if (result := collect.take(await self._ws.recv())) is not None:
                return result

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()


def terminal_connect(
    config: Config, vm_id: str, cols: int, rows: int
) -> websockets.sync.client.ClientConnection:
    """An open terminal WebSocket: send bytes (keystrokes) and ``{"type": "resize", ...}`` text, receive bytes
    (the screen) and finally ``{"type": "exit", "exit_code": N}``."""
    try:
        return websockets.sync.client.connect(
            socket_url(config, terminal_socket(vm_id, cols, rows)),
            additional_headers={"Authorization": config.authorization()},
            legacy=True,
        )
    except InvalidStatus as exc:
        raise _refused(exc) from None


async def terminal_connect_async(
    config: Config, vm_id: str, cols: int, rows: int
) -> websockets.asyncio.client.ClientConnection:
    try:
        return await websockets.asyncio.client.connect(
            socket_url(config, terminal_socket(vm_id, cols, rows)),
            additional_headers={"Authorization": config.authorization()},
        )
    except InvalidStatus as exc:
        raise _refused(exc) from None
