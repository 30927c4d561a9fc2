"""``corral.AsyncClient``: the same surface as ``corral.Client`` (every method awaited, iterators
asynchronous) over an asynchronous httpx client. Requests are built by ``corral.sdk.endpoints``, retries
decided by ``corral.sdk.retry``, exactly as for the synchronous client."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Concatenate, Self

import anyio
import httpx
from websockets.asyncio.client import ClientConnection

from corral.sdk import retry, sockets, waiting
from corral.sdk.call import Call, next_page
from corral.sdk.config import Config, resolve
from corral.sdk.endpoints import account, node, state, vms
from corral.sdk.errors import APIConnectionError, error_for
from corral.sdk.models import ExecEvent, ExecExit, Health, Page, Snapshot, Vm
from corral.sdk.sse import ExecEvents
from corral.sdk.transport import (
    DEFAULT_TIMEOUT,
    USER_AGENT,
    USES,
    call_timeout,
    client_timeout,
    headers_for,
    proxy_url,
    uses,
)

sleep = anyio.sleep  # tests replace it to see the waits without waiting


class AsyncRunner:
    """Sends calls: authorization, retries (``corral.sdk.retry``), errors as exceptions."""

    def __init__(self, config: Config, http: httpx.AsyncClient, max_retries: int) -> None:
        self.config = config
        self.http = http
        self.max_retries = max_retries
        self._timeout = client_timeout(http.timeout)

    async def send(self, call: Call[Any]) -> httpx.Response:
        """The answer (unread if ``call.stream``, else read and closed), after retries."""
        headers = headers_for(call, self.config.authorization)
        attempt = 0
        while True:
            request = self.http.build_request(
                call.method,
                call.path,
                params=call.query(),
                json=call.json,
                content=call.upload.acontent() if call.upload is not None else None,
                headers=headers,
                timeout=call_timeout(self._timeout, call),
            )
            try:
                resp = await self.http.send(request, stream=True)
                if not call.stream or resp.status_code >= 400:
                    try:
                        await resp.aread()
                    finally:
                        await resp.aclose()
            except httpx.TransportError as exc:
                delay = retry.after_error(
                    call.method,
                    exc,
                    attempt,
                    self.max_retries,
                    call.replayable,
                    idempotent=call.idempotency_key is not None,
                )
                if delay is None:
                    raise APIConnectionError(f"{call.method} {call.path}: {exc!r}") from exc
            else:
                if resp.status_code < 400:
                    return resp
                delay = retry.after_status(
                    resp.status_code, resp.headers, attempt, self.max_retries, call.replayable
                )
                if delay is None:
                    if not call.raise_errors:
                        return resp
                    raise error_for(resp.status_code, resp.headers, resp.content)
            await sleep(delay)
            attempt += 1

    async def run[T](self, call: Call[T]) -> T:
        return call.parse(await self.send(call))

    async def pages[T](self, call: Call[Page[T]]) -> AsyncIterator[T]:
        current: Call[Page[T]] | None = call
        while current is not None:
            got = await self.run(current)
            for item in got.data:
                yield item
            current = next_page(current, got)


class AsyncNamespace:
    def __init__(self, runner: AsyncRunner) -> None:
        self._runner = runner


def _bind[**P, T](
    build: Callable[P, Call[T]],
) -> Callable[Concatenate[AsyncNamespace, P], Coroutine[Any, Any, T]]:
    @functools.wraps(build)
    async def method(self: AsyncNamespace, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._runner.run(build(*args, **kwargs))

    setattr(method, USES, (build,))
    return method


def _bind_iter[**P, T](
    build: Callable[P, Call[Page[T]]],
) -> Callable[Concatenate[AsyncNamespace, P], AsyncIterator[T]]:
    @functools.wraps(build)
    def method(self: AsyncNamespace, /, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        """Every item of every page (``async for``), fetching the next page as the iteration reaches it."""
        return self._runner.pages(build(*args, **kwargs))

    setattr(method, USES, (build,))
    return method


class AsyncExecStream:
    """A command's output as it is written: ``async for`` over ``ExecOutput`` chunks and a last
    ``ExecExit``. Closing it (or leaving the ``async with`` block) before the end kills the command."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._events = ExecEvents()

    @property
    def exit(self) -> ExecExit | None:
        return self._events.exit

    async def __aiter__(self) -> AsyncIterator[ExecEvent]:
        try:
            async for chunk in self._response.aiter_bytes():
                for event in self._events.feed(chunk):
                    yield event
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the exec stream broke: {exc!r}") from exc
        finally:
            await self.aclose()
        if self._events.exit is None:
            raise APIConnectionError("the exec stream ended before the command's exit")

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncVms(AsyncNamespace):
    """VMs, their commands, files and state."""

    create = _bind(vms.create)
    list = _bind(vms.list_vms)
    iter = _bind_iter(vms.list_vms)
    history = _bind(vms.history)
    iter_history = _bind_iter(vms.history)
    get = _bind(vms.get)
    reset_timer = _bind(vms.reset_timer)
    start = _bind(vms.start)
    stop = _bind(vms.stop)
    destroy = _bind(vms.destroy)
    exec = _bind(vms.exec_command)
    upload = _bind(vms.upload)
    list_files = _bind(vms.list_files)
    iter_files = _bind_iter(vms.list_files)
    ssh = _bind(vms.ssh)
    proxy_ticket = _bind(vms.proxy_ticket)
    hibernate = _bind(state.hibernate)
    resume = _bind(state.resume)
    fork = _bind(state.fork)
    rollback = _bind(state.rollback)
    snapshot = _bind(state.create_snapshot)
    checkpoint = _bind(state.create_checkpoint)

    @uses(vms.get)
    async def wait_ready(self, vm_id: str, *, timeout: float = waiting.DEFAULT_WAIT) -> Vm:  # noqa: ASYNC109
        """Poll until the VM is ``ready``; ``WaitError`` if it fails, stops or the time runs out."""
        deadline = time.monotonic() + timeout
        interval = waiting.POLL_INTERVAL
        while True:
            vm = await self._runner.run(vms.get(vm_id))
            if waiting.vm_ready(vm):
                return vm
            if time.monotonic() >= deadline:
                raise waiting.timed_out(f"VM {vm_id}", timeout)
            await sleep(interval)
            interval = waiting.next_interval(interval)

    @uses(vms.exec_stream)
    async def exec_stream(
        self,
        vm_id: str,
        command: str | Sequence[str],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the command's, enforced by the server)
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AsyncExecStream:
        """Run a command and read its output as it comes (no output cap)."""
        call = vms.exec_stream(vm_id, command, timeout=timeout, env=env, cwd=cwd, user=user)
        return AsyncExecStream(await self._runner.send(call))

    @uses(vms.download)
    async def download(self, vm_id: str, path: str) -> bytes:
        """The whole file at ``path`` in the VM."""
        resp = await self._runner.send(vms.download(vm_id, path))
        try:
            return await resp.aread()
        finally:
            await resp.aclose()

    @uses(vms.download)
    async def download_to(self, vm_id: str, path: str, dest: str | Path | BinaryIO) -> int:
        """Stream the file at ``path`` in the VM into ``dest`` (a local path or an open binary file; writes
        happen in a worker thread); returns the bytes written."""
        resp = await self._runner.send(vms.download(vm_id, path))
        try:
            if isinstance(dest, str | Path):
                out = await anyio.to_thread.run_sync(Path(dest).open, "wb")
                try:
                    return await _copy(resp.aiter_bytes(), out)
                finally:
                    await anyio.to_thread.run_sync(out.close)
            return await _copy(resp.aiter_bytes(), dest)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the download broke: {exc!r}") from exc
        finally:
            await resp.aclose()

    @uses(vms.proxy_request)
    async def proxy(
        self,
        vm_id: str,
        port: int,
        path: str = "",
        *,
        method: str = "GET",
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """Send an HTTP request to a server listening on ``port`` inside the VM; the answer whatever its
        status."""
        call = vms.proxy_request(vm_id, port, path, method=method, params=params, content=content)
        return await self._runner.send(call)

    @uses(sockets.shell_socket)
    def shell(self, vm_id: str) -> sockets.AsyncShell:
        """A long-lived bash in the VM (WebSocket ``/shell``): ``async with client.vms.shell(vm_id) as sh:
        await sh.run("pwd")``; the directory and variables carry over between commands."""
        return sockets.AsyncShell(self._runner.config, vm_id)

    @uses(sockets.terminal_socket)
    async def terminal(self, vm_id: str, *, cols: int = 80, rows: int = 24) -> ClientConnection:
        """A terminal in the VM (WebSocket ``/terminal``): bytes both ways, JSON control messages as text."""
        return await sockets.terminal_connect_async(self._runner.config, vm_id, cols, rows)

    def proxy_url(self, vm_id: str, port: int, path: str = "", *, websocket: bool = False) -> str:
        """The URL of ``path`` on a server inside the VM, through the API, for a program that sends the API
        key in the ``Authorization`` header (``websocket=True``: the ``ws://`` URL of a WebSocket there). A
        browser opens ``proxy_ticket(vm_id, port, path).url`` instead: the port on its own origin."""
        return proxy_url(self._runner.config, vm_id, port, path, websocket=websocket)


async def _copy(chunks: AsyncIterator[bytes], out: BinaryIO) -> int:
    size = 0
    async for chunk in chunks:
        await anyio.to_thread.run_sync(out.write, chunk)
        size += len(chunk)
    return size


class AsyncSnapshots(AsyncNamespace):
    create = _bind(state.create_snapshot)
    list = _bind(state.list_snapshots)
    iter = _bind_iter(state.list_snapshots)
    list_for_vm = _bind(state.list_vm_snapshots)
    get = _bind(state.get_snapshot)
    delete = _bind(state.delete_snapshot)

    @uses(state.get_snapshot)
    async def wait_ready(self, snapshot_id: str, *, timeout: float = waiting.DEFAULT_WAIT) -> Snapshot:  # noqa: ASYNC109
        """Poll until the snapshot is ``ready``; ``WaitError`` if it fails or the time runs out."""
        deadline = time.monotonic() + timeout
        interval = waiting.POLL_INTERVAL
        while True:
            snap = await self._runner.run(state.get_snapshot(snapshot_id))
            if waiting.snapshot_ready(snap):
                return snap
            if time.monotonic() >= deadline:
                raise waiting.timed_out(f"snapshot {snapshot_id}", timeout)
            await sleep(interval)
            interval = waiting.next_interval(interval)


class AsyncCheckpoints(AsyncNamespace):
    create = _bind(state.create_checkpoint)
    list = _bind(state.list_checkpoints)
    iter = _bind_iter(state.list_checkpoints)
    get = _bind(state.get_checkpoint)
    delete = _bind(state.delete_checkpoint)


class AsyncSecrets(AsyncNamespace):
    create = _bind(account.create_secret)
    list = _bind(account.list_secrets)
    iter = _bind_iter(account.list_secrets)
    get = _bind(account.get_secret)
    update = _bind(account.update_secret)
    delete = _bind(account.delete_secret)


class AsyncEnv(AsyncNamespace):
    list = _bind(account.list_env)
    iter = _bind_iter(account.list_env)
    get = _bind(account.get_env)
    set = _bind(account.set_env)
    delete = _bind(account.delete_env)


class AsyncEgress(AsyncNamespace):
    get_policy = _bind(account.get_policy)
    set_policy = _bind(account.set_policy)
    list_rules = _bind(account.list_rules)
    iter_rules = _bind_iter(account.list_rules)
    create_rule = _bind(account.create_rule)
    get_rule = _bind(account.get_rule)
    delete_rule = _bind(account.delete_rule)


class AsyncAudit(AsyncNamespace):
    list_egress = _bind(account.list_egress_events)
    iter_egress = _bind_iter(account.list_egress_events)


class AsyncUsers(AsyncNamespace):
    create = _bind(account.create_user)
    me = _bind(account.me)
    change_password = _bind(account.change_password)


class AsyncApiKeys(AsyncNamespace):
    list = _bind(account.list_api_keys)
    iter = _bind_iter(account.list_api_keys)
    create = _bind(account.create_api_key)
    revoke = _bind(account.revoke_api_key)


class AsyncDeviceLogin(AsyncNamespace):
    request_code = _bind(account.device_code)
    poll = _bind(account.device_poll)
    approve = _bind(account.device_approve)


class AsyncImages(AsyncNamespace):
    list = _bind(account.list_images)


class AsyncUsage(AsyncNamespace):
    get = _bind(account.usage)


class AsyncNode(AsyncNamespace):
    get = _bind(node.get_node)


class AsyncClient:
    """The Corral API, asynchronously: the surface of ``corral.Client`` with every call awaited. Use it as
    ``async with AsyncClient() as client`` or await ``aclose()``."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = resolve(api_key, base_url)
        self._http = httpx.AsyncClient(
            base_url=self.config.base_url,
            timeout=client_timeout(timeout),
            transport=transport,
            headers={"User-Agent": USER_AGENT},
        )
        runner = AsyncRunner(self.config, self._http, max_retries)
        self._runner = runner
        self.vms = AsyncVms(runner)
        self.snapshots = AsyncSnapshots(runner)
        self.checkpoints = AsyncCheckpoints(runner)
        self.secrets = AsyncSecrets(runner)
        self.env = AsyncEnv(runner)
        self.egress = AsyncEgress(runner)
        self.audit = AsyncAudit(runner)
        self.users = AsyncUsers(runner)
        self.api_keys = AsyncApiKeys(runner)
        self.device_login = AsyncDeviceLogin(runner)
        self.images = AsyncImages(runner)
        self.usage = AsyncUsage(runner)
        self.node = AsyncNode(runner)

    @property
    def base_url(self) -> str:
        return self.config.base_url

    @uses(account.health)
    async def health(self) -> Health:
        """Liveness (no API key needed)."""
        return await self._runner.run(account.health())

    @uses(account.ready)
    async def ready(self) -> Health:
        """Readiness: the server's database answers."""
        return await self._runner.run(account.ready())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
