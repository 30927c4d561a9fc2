"""Running a command through a sandbox's corral-init: one unix-socket connection per command, its stdout and
stderr as pipes handed over with SCM_RIGHTS. About 1 ms instead of the ~9 ms of starting the runtime's exec.

Closing the connection before the command ends (a timeout, a client that went away) makes corral-init kill
the command's whole session, fork bombs included."""

from __future__ import annotations

import asyncio
import os
import selectors
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path

from corral.node.execution import TIMEOUT_EXIT_CODE, Event, Exit, Output

PROTOCOL = b"corral-exec-1"
DETACH = b"corral-detach-1\0"


class AgentUnavailable(Exception):
    """The sandbox has no corral-init socket (booted with another init): use the runtime's exec."""


def encode_request(args: Sequence[str], env: Mapping[str, str], cwd: str, uid: int, gid: int) -> bytes:
    """The request corral-init parses: NUL-terminated fields (see init.c)."""
    fields = [PROTOCOL, str(uid).encode(), str(gid).encode(), cwd.encode(), str(len(args)).encode()]
    fields += [a.encode() for a in args]
    fields.append(str(len(env)).encode())
    fields += [f"{k}={v}".encode() for k, v in env.items()]
    for f in fields:
        if b"\0" in f:
            raise ValueError("arguments and environment must not contain NUL")
    return b"".join(f + b"\0" for f in fields)


def parse_user(user: str | None) -> tuple[int, int]:
    """``uid[:gid]`` (already resolved from names) as numbers; no gid means group 0, as the runtimes do."""
    if user is None:
        return 0, 0
    head, _, group = user.partition(":")
    return int(head), int(group) if group else 0


def exit_code(status: int) -> int:
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 255


def connect(sock_path: Path, request: bytes) -> socket.socket:
    """A connection to the sandbox's command server for ``request`` (checked against its 1 MiB limit)."""
    if len(request) > (1 << 20):
        raise ValueError("command and environment are over 1 MiB together")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.connect(str(sock_path))
    except OSError as exc:
        conn.close()
        raise AgentUnavailable(str(exc)) from exc
    return conn


async def connect_async(sock_path: Path, request: bytes) -> socket.socket:
    """Like :func:`connect`, awaited: a non-blocking connection (a command server whose backlog is full, in
    a sandbox starved of CPU, never holds the event loop)."""
    if len(request) > (1 << 20):
        raise ValueError("command and environment are over 1 MiB together")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        await asyncio.get_running_loop().sock_connect(conn, str(sock_path))
    except OSError as exc:
        conn.close()
        raise AgentUnavailable(str(exc)) from exc
    except BaseException:
        conn.close()
        raise
    return conn


async def send_request(conn: socket.socket, request: bytes, fds: Sequence[int]) -> None:
    """The request with ``fds`` attached to its first byte, on a non-blocking connection (what the first send
    leaves over follows as the server reads)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            sent = socket.send_fds(conn, [request], list(fds))
            break
        except BlockingIOError:
            await _ready(loop, conn.fileno(), readable=False)
    if sent < len(request):
        await loop.sock_sendall(conn, request[sent:])


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, readable: bool) -> None:
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    (loop.add_reader if readable else loop.add_writer)(fd, wake)
    try:
        await waiter
    finally:
        (loop.remove_reader if readable else loop.remove_writer)(fd)


async def _readable(loop: asyncio.AbstractEventLoop, fds: Sequence[int], wait_s: float) -> list[int]:
    """Which of ``fds`` can be read now, waiting up to ``wait_s`` seconds for one to be."""
    ready: list[int] = []
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(fd: int) -> None:
        ready.append(fd)
        if not waiter.done():
            waiter.set_result(None)

    for fd in fds:
        loop.add_reader(fd, wake, fd)
    try:
        await asyncio.wait_for(waiter, wait_s)
    except TimeoutError:
        pass
    finally:
        for fd in fds:
            loop.remove_reader(fd)
    return ready


def read_control(control: bytes) -> tuple[int | None, int | None]:
    """(the command's pid inside the sandbox, its wait status) from what corral-init has sent on the control
    connection so far (``pid N``, ``exit N`` lines; ``error MESSAGE`` raises RuntimeError)."""
    inner_pid: int | None = None
    status: int | None = None
    for line in control.split(b"\n"):
        if line.startswith(b"pid "):
            inner_pid = int(line[4:])
        elif line.startswith(b"exit "):
            status = int(line[5:])
        elif line.startswith(b"error "):
            raise RuntimeError(line[6:].decode(errors="replace"))
    return inner_pid, status


async def run_via_agent_async(
    sock_path: Path,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    user: str | None,
    timeout: float,  # noqa: ASYNC109  # the command's, not this call's
    kill_session: Callable[[int], None] | None = None,
    background: Callable[[Callable[[int], None], int], None] | None = None,
) -> AsyncIterator[Event]:
    """:func:`run_via_agent` for the event loop: nothing waits in a thread while the command runs. Closing the
    iterator before the end (the client went away, the task was cancelled) closes the connection, and
    corral-init kills the command's session; ``kill_session`` then runs through ``background`` (a bounded
    pool; it sleeps while it kills), as on a timeout."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    request = encode_request(args, env, cwd, *parse_user(user))
    conn = await connect_async(sock_path, request)
    # the command's ends stay blocking (a command writing to a non-blocking pipe gets EAGAIN once it is full):
    # only ours are made non-blocking
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(out_r, False)
    os.set_blocking(err_r, False)
    status: int | None = None
    inner_pid: int | None = None
    timed_out = False

    def kill_in_background() -> None:
        if kill_session is not None and inner_pid is not None:
            if background is not None:
                background(kill_session, inner_pid)
            else:
                kill_session(inner_pid)

    try:
        try:
            await send_request(conn, request, [out_w, err_w])
        finally:
            os.close(out_w)
            os.close(err_w)
        names = {out_r: "stdout", err_r: "stderr", conn.fileno(): "control"}
        watched = list(names)
        control = b""
        open_pipes = 2
        deadline = start + timeout
        while open_pipes or status is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if timed_out:
                    break
                timed_out = True
                conn.shutdown(socket.SHUT_RDWR)  # corral-init kills the command's session
                kill_in_background()
                deadline = time.monotonic() + 2.0  # drain what is left
                continue
            for fd in await _readable(loop, watched, min(remaining, 1.0)):
                try:
                    data = os.read(fd, 65536)
                except (BlockingIOError, ConnectionResetError):
                    continue
                if names[fd] == "control":
                    if not data:
                        watched.remove(fd)
                        if status is None and not timed_out:
                            message = control.decode(errors="replace").strip()
                            raise RuntimeError(f"the sandbox's init dropped the command: {message!r}")
                        continue
                    control += data
                    inner_pid, status = read_control(control)
                    continue
                if not data:
                    watched.remove(fd)
                    open_pipes -= 1
                    continue
                yield Output(names[fd], data)
            if timed_out and status is None and not open_pipes:
                break
        duration = int((time.monotonic() - start) * 1000)
        if timed_out:
            yield Exit(TIMEOUT_EXIT_CODE, True, duration)
        else:
            yield Exit(exit_code(status or 0), False, duration)
    finally:
        conn.close()  # before the command ended: corral-init kills its session
        if status is None and not timed_out:
            kill_in_background()  # the reader went away before the end
        os.close(out_r)
        os.close(err_r)


def run_via_agent(
    sock_path: Path,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    user: str | None,
    timeout: float,
    kill_session: Callable[[int], None] | None = None,
) -> Iterator[Event]:
    """``kill_session(pid)``: ends the session of the command whose pid inside the sandbox is ``pid``, from the
    host. corral-init kills it too, but it runs inside the sandbox's CPU quota, which a fork bomb exhausts."""
    start = time.monotonic()
    request = encode_request(args, env, cwd, *parse_user(user))
    conn = connect(sock_path, request)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    sel = selectors.DefaultSelector()
    try:
        try:
            socket.send_fds(conn, [request], [out_w, err_w])
        finally:
            os.close(out_w)
            os.close(err_w)
        for fd, name in ((out_r, "stdout"), (err_r, "stderr"), (conn.fileno(), "control")):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, name)
        control = b""
        status: int | None = None
        inner_pid: int | None = None
        open_pipes = 2
        deadline = start + timeout
        timed_out = False
        while open_pipes or status is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if timed_out:
                    break
                timed_out = True
                conn.shutdown(socket.SHUT_RDWR)  # corral-init kills the command's session
                if kill_session is not None and inner_pid is not None:
                    kill_session(inner_pid)
                deadline = time.monotonic() + 2.0  # drain what is left
                continue
            for key, _ in sel.select(timeout=min(remaining, 1.0)):
                try:
                    data = os.read(key.fd, 65536)
                except (BlockingIOError, ConnectionResetError):
                    continue
                if key.data == "control":
                    if not data:
                        sel.unregister(key.fd)
                        if status is None and not timed_out:
                            message = control.decode(errors="replace").strip()
                            raise RuntimeError(f"the sandbox's init dropped the command: {message!r}")
                        continue
                    control += data
                    inner_pid, status = read_control(control)
                    continue
                if not data:
                    sel.unregister(key.fd)
                    open_pipes -= 1
                    continue
                yield Output(str(key.data), data)
            if timed_out and status is None and not open_pipes:
                break
        duration = int((time.monotonic() - start) * 1000)
        if timed_out:
            yield Exit(TIMEOUT_EXIT_CODE, True, duration)
        else:
            yield Exit(exit_code(status or 0), False, duration)
    finally:
        sel.close()
        conn.close()  # before the command ended: corral-init kills its session
        if status is None and not timed_out and kill_session is not None and inner_pid is not None:
            kill_session(inner_pid)  # the reader went away before the end
        os.close(out_r)
        os.close(err_r)


def detach_agent(sock_path: Path, timeout: float = 10.0) -> None:
    """Ask the sandbox's command server to let go of the host before a checkpoint: commands still attached
    are ended and its listening socket (bound outside the sandbox, which CRIU cannot dump) closed."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn.settimeout(timeout)
    try:
        conn.connect(str(sock_path))
        conn.sendall(DETACH)
        answer = b""
        while chunk := conn.recv(16):  # to the end: the server has closed its side (nothing of it is left
            answer += chunk  # for CRIU to find)
    except OSError as exc:
        raise AgentUnavailable(f"the command server did not answer: {exc}") from exc
    finally:
        conn.close()
    if answer != b"ok\n":
        raise AgentUnavailable(f"the command server refused to detach: {answer!r}")
