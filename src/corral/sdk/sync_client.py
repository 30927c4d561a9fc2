"""``corral.Client``: the API over a synchronous httpx client. The requests themselves are built in
``corral.sdk.endpoints``; this module sends them (with retries) and adds what needs a loop: iterating pages,
waiting for a VM, streaming exec output and downloads."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Concatenate, Self

import httpx
from websockets.sync.client import ClientConnection

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

sleep = time.sleep  # tests replace it to see the waits without waiting


class Runner:
    """Sends calls: authorization, retries (``corral.sdk.retry``), errors as exceptions."""

    def __init__(self, config: Config, http: httpx.Client, max_retries: int) -> None:
        self.config = config
        self.http = http
        self.max_retries = max_retries
        self._timeout = client_timeout(http.timeout)

    def send(self, call: Call[Any]) -> httpx.Response:
        """The answer (unread if ``call.stream``, else read and closed), after retries."""
        headers = headers_for(call, self.config.authorization)
        attempt = 0
        while True:
            request = self.http.build_request(
                call.method,
                call.path,
                params=call.query(),
                json=call.json,
                content=call.upload.content() if call.upload is not None else None,
                headers=headers,
                timeout=call_timeout(self._timeout, call),
            )
            try:
                resp = self.http.send(request, stream=True)
                if not call.stream or resp.status_code >= 400:
                    try:
                        resp.read()
                    finally:
                        resp.close()
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
            sleep(delay)
            attempt += 1

    def run[T](self, call: Call[T]) -> T:
        return call.parse(self.send(call))

    def pages[T](self, call: Call[Page[T]]) -> Iterator[T]:
        current: Call[Page[T]] | None = call
        while current is not None:
            got = self.run(current)
            yield from got.data
            current = next_page(current, got)


class Namespace:
    def __init__(self, runner: Runner) -> None:
        self._runner = runner


def _bind[**P, T](build: Callable[P, Call[T]]) -> Callable[Concatenate[Namespace, P], T]:
    @functools.wraps(build)
    def method(self: Namespace, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._runner.run(build(*args, **kwargs))

    setattr(method, USES, (build,))
    return method


def _bind_iter[**P, T](build: Callable[P, Call[Page[T]]]) -> Callable[Concatenate[Namespace, P], Iterator[T]]:
    @functools.wraps(build)
    def method(self: Namespace, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        """Every item of every page, fetching the next page as the iteration reaches it."""
        return self._runner.pages(build(*args, **kwargs))

    setattr(method, USES, (build,))
    return method


class ExecStream:
    """A command's output as it is written: iterate for ``ExecOutput`` chunks and a last ``ExecExit``.
    Closing it (or leaving the ``with`` block) before the end kills the command."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._events = ExecEvents()

    @property
    def exit(self) -> ExecExit | None:
        """The exit event, once the iteration reached it."""
        return self._events.exit

    def __iter__(self) -> Iterator[ExecEvent]:
        try:
            for chunk in self._response.iter_bytes():
                yield from self._events.feed(chunk)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the exec stream broke: {exc!r}") from exc
        finally:
            self.close()
        if self._events.exit is None:
            raise APIConnectionError("the exec stream ended before the command's exit")

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vms(Namespace):
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
    def wait_ready(self, vm_id: str, *, timeout: float = waiting.DEFAULT_WAIT) -> Vm:
        """Poll until the VM is ``ready``; ``WaitError`` if it fails, stops or the time runs out."""
        deadline = time.monotonic() + timeout
        interval = waiting.POLL_INTERVAL
        while True:
            vm = self._runner.run(vms.get(vm_id))
            if waiting.vm_ready(vm):
                return vm
            if time.monotonic() >= deadline:
                raise waiting.timed_out(f"VM {vm_id}", timeout)
            sleep(interval)
            interval = waiting.next_interval(interval)

    @uses(vms.exec_stream)
    def exec_stream(
        self,
        vm_id: str,
        command: str | Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> ExecStream:
        """Run a command and read its output as it comes (no output cap)."""
        call = vms.exec_stream(vm_id, command, timeout=timeout, env=env, cwd=cwd, user=user)
        return ExecStream(self._runner.send(call))

    @uses(vms.download)
    def download(self, vm_id: str, path: str) -> bytes:
        """The whole file at ``path`` in the VM."""
        resp = self._runner.send(vms.download(vm_id, path))
        try:
            return resp.read()
        finally:
            resp.close()

    @uses(vms.download)
    def download_to(self, vm_id: str, path: str, dest: str | Path | BinaryIO) -> int:
        """Stream the file at ``path`` in the VM into ``dest`` (a local path or an open binary file);
        returns the bytes written."""
        resp = self._runner.send(vms.download(vm_id, path))
        try:
            if isinstance(dest, str | Path):
                with Path(dest).open("wb") as out:
                    return _copy(resp.iter_bytes(), out)
            return _copy(resp.iter_bytes(), dest)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the download broke: {exc!r}") from exc
        finally:
            resp.close()

    @uses(vms.proxy_request)
    def proxy(
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
        return self._runner.send(call)

    @uses(sockets.shell_socket)
    def shell(self, vm_id: str) -> sockets.Shell:
        """A long-lived bash in the VM (WebSocket ``/shell``): ``with client.vms.shell(vm_id) as sh:
        sh.run("cd /tmp"); sh.run("pwd").stdout``; the directory and variables carry over between commands."""
        return sockets.Shell(self._runner.config, vm_id)

    @uses(sockets.terminal_socket)
    def terminal(self, vm_id: str, *, cols: int = 80, rows: int = 24) -> ClientConnection:
        """A terminal in the VM (WebSocket ``/terminal``): send keystrokes as bytes and ``{"type": "resize",
        "cols", "rows"}`` as text; receive the screen as bytes, then ``{"type": "exit", "exit_code"}``."""
        return sockets.terminal_connect(self._runner.config, vm_id, cols, rows)

    def proxy_url(self, vm_id: str, port: int, path: str = "", *, websocket: bool = False) -> str:
        """The URL of ``path`` on a server inside the VM, through the API, for a program that sends the API
        key in the ``Authorization`` header (``websocket=True``: the ``ws://`` URL of a WebSocket there). A
        browser opens ``proxy_ticket(vm_id, port, path).url`` instead: the port on its own origin."""
        return proxy_url(self._runner.config, vm_id, port, path, websocket=websocket)


def _copy(chunks: Iterator[bytes], out: BinaryIO) -> int:
    size = 0
    for chunk in chunks:
        out.write(chunk)
        size += len(chunk)
    return size


class Snapshots(Namespace):
    create = _bind(state.create_snapshot)
    list = _bind(state.list_snapshots)
    iter = _bind_iter(state.list_snapshots)
    list_for_vm = _bind(state.list_vm_snapshots)
    get = _bind(state.get_snapshot)
    delete = _bind(state.delete_snapshot)

    @uses(state.get_snapshot)
    def wait_ready(self, snapshot_id: str, *, timeout: float = waiting.DEFAULT_WAIT) -> Snapshot:
        """Poll until the snapshot is ``ready``; ``WaitError`` if it fails or the time runs out."""
        deadline = time.monotonic() + timeout
        interval = waiting.POLL_INTERVAL
        while True:
            snap = self._runner.run(state.get_snapshot(snapshot_id))
            if waiting.snapshot_ready(snap):
                return snap
            if time.monotonic() >= deadline:
                raise waiting.timed_out(f"snapshot {snapshot_id}", timeout)
            sleep(interval)
            interval = waiting.next_interval(interval)


class Checkpoints(Namespace):
    create = _bind(state.create_checkpoint)
    list = _bind(state.list_checkpoints)
    iter = _bind_iter(state.list_checkpoints)
    get = _bind(state.get_checkpoint)
    delete = _bind(state.delete_checkpoint)


class Secrets(Namespace):
    create = _bind(account.create_secret)
    list = _bind(account.list_secrets)
    iter = _bind_iter(account.list_secrets)
    get = _bind(account.get_secret)
    update = _bind(account.update_secret)
    delete = _bind(account.delete_secret)


class Env(Namespace):
    list = _bind(account.list_env)
    iter = _bind_iter(account.list_env)
    get = _bind(account.get_env)
    set = _bind(account.set_env)
    delete = _bind(account.delete_env)


class Egress(Namespace):
    get_policy = _bind(account.get_policy)
    set_policy = _bind(account.set_policy)
    list_rules = _bind(account.list_rules)
    iter_rules = _bind_iter(account.list_rules)
    create_rule = _bind(account.create_rule)
    get_rule = _bind(account.get_rule)
    delete_rule = _bind(account.delete_rule)


class Audit(Namespace):
    list_egress = _bind(account.list_egress_events)
    iter_egress = _bind_iter(account.list_egress_events)


class Users(Namespace):
    create = _bind(account.create_user)
    me = _bind(account.me)
    change_password = _bind(account.change_password)


class ApiKeys(Namespace):
    list = _bind(account.list_api_keys)
    iter = _bind_iter(account.list_api_keys)
    create = _bind(account.create_api_key)
    revoke = _bind(account.revoke_api_key)


class DeviceLogin(Namespace):
    request_code = _bind(account.device_code)
    poll = _bind(account.device_poll)
    approve = _bind(account.device_approve)


class Images(Namespace):
    list = _bind(account.list_images)


class Usage(Namespace):
    get = _bind(account.usage)


class Node(Namespace):
    get = _bind(node.get_node)


class Client:
    """The Corral API. ``api_key`` and ``base_url`` default to ``CORRAL_API_KEY`` / ``CORRAL_URL``, then to the
    CLI's saved login (``corral login``), then to the CLI's default URL. Use it as a context manager or call
    ``close()``. ``transport`` replaces httpx's (tests, proxies)."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = resolve(api_key, base_url)
        self._http = httpx.Client(
            base_url=self.config.base_url,
            timeout=client_timeout(timeout),
            transport=transport,
            headers={"User-Agent": USER_AGENT},
        )
        runner = Runner(self.config, self._http, max_retries)
        self._runner = runner
        self.vms = Vms(runner)
        self.snapshots = Snapshots(runner)
        self.checkpoints = Checkpoints(runner)
        self.secrets = Secrets(runner)
        self.env = Env(runner)
        self.egress = Egress(runner)
        self.audit = Audit(runner)
        self.users = Users(runner)
        self.api_keys = ApiKeys(runner)
        self.device_login = DeviceLogin(runner)
        self.images = Images(runner)
        self.usage = Usage(runner)
        self.node = Node(runner)

    @property
    def base_url(self) -> str:
        return self.config.base_url

    @uses(account.health)
    def health(self) -> Health:
        """Liveness (no API key needed)."""
        return self._runner.run(account.health())

    @uses(account.ready)
    def ready(self) -> Health:
        """Readiness: the server's database answers."""
        return self._runner.run(account.ready())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
