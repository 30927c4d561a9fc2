"""The host's side of the file workers (``fileworker``): the fork server, started once per process and again
if it ends, and sessions with one worker each, asyncio (``AsyncSession``: the API's routes and SFTP, nothing
held while a worker works) or blocking with a timeout (``SyncSession``: for code already in a thread).

Every call has a deadline; a worker that misses it is killed through its pidfd and the session is over. A
read that blocks in the kernel then costs one killable process, never a server thread or the event loop.

Every session is tracked by the container id of its sandbox (``SandboxFiles.cid``): ``end_file_access(cid)``,
called by the node before it tears a sandbox down (stop, destroy, hibernate, the end of a restore or
rollback), kills each of its workers and tells each watcher (an SFTP session) to end, so nothing keeps a
destroyed VM's disk open or writable.

The fork server starts with a scrubbed environment (``worker_env``): a worker never holds the server's
settings or secrets (``CORRAL_DATABASE_URL``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import corral
from corral.node import fileproto
from corral.node.files import FileError, SandboxFiles

DEFAULT_TIMEOUT_S = 30.0
_HELLO = fileproto.HELLO


class WorkerUnavailable(FileError):
    """The worker ended or missed its deadline (the operation may be retried)."""

    def __init__(self, message: str) -> None:
        super().__init__("busy", message)


_ENV_KEPT = ("PATH", "LANG", "LC_ALL", "TZ")


def worker_env(environ: dict[str, str]) -> dict[str, str]:
    """The fork server's environment: only what Python needs to run it (no ``CORRAL_*`` setting, no secret)."""
    env = {name: environ[name] for name in _ENV_KEPT if name in environ}
    package_parent = str(Path(corral.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_parent
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class _Tracked:
    """What ``end_file_access`` can end: a session's worker (by its pidfd) and its socket. Its pidfd and socket
    are set, and closed, only under the registry's lock, so an end never acts on a closed or reused fd."""

    def __init__(self, cid: str) -> None:
        self.cid = cid
        self.ended = False
        self._pidfd = -1
        self._tracked_sock: socket.socket | None = None

    def end_locked(self) -> None:
        self.ended = True
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        if self._tracked_sock is not None:
            with contextlib.suppress(OSError):
                self._tracked_sock.shutdown(socket.SHUT_RDWR)


class _Registry:
    """The live sessions and the SFTP watchers of each sandbox, by container id (thread-safe: the API's loop,
    the SSH gateway's loop and the node's threads all use it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._sessions: dict[str, set[_Tracked]] = {}
        self._watchers: dict[str, dict[int, Callable[[], None]]] = {}
        self._next = 0

    def add(self, item: _Tracked) -> None:
        with self.lock:
            self._sessions.setdefault(item.cid, set()).add(item)

    def remove(self, item: _Tracked) -> None:
        """Forget ``item`` (under the lock: the caller then closes its fds)."""
        held = self._sessions.get(item.cid)
        if held is not None:
            held.discard(item)
            if not held:
                del self._sessions[item.cid]

    def watch(self, cid: str, on_end: Callable[[], None]) -> Callable[[], None]:
        with self.lock:
            self._next += 1
            number = self._next
            self._watchers.setdefault(cid, {})[number] = on_end

        def unwatch() -> None:
            with self.lock:
                held = self._watchers.get(cid)
                if held is not None:
                    held.pop(number, None)
                    if not held:
                        del self._watchers[cid]

        return unwatch

    def end(self, cid: str) -> int:
        with self.lock:
            sessions = self._sessions.pop(cid, set())
            watchers = list(self._watchers.pop(cid, {}).values())
            for item in sessions:
                item.end_locked()
        for on_end in watchers:
            with contextlib.suppress(Exception):
                on_end()
        return len(sessions) + len(watchers)

    def count(self, cid: str) -> int:
        with self.lock:
            return len(self._sessions.get(cid, ())) + len(self._watchers.get(cid, {}))


_REGISTRY = _Registry()


def end_file_access(cid: str) -> int:
    """End every file worker and SFTP session of sandbox ``cid`` (the node calls it before, and again right
    after, it ends the sandbox's init). Returns how many were ended."""
    if not cid:
        return 0
    return _REGISTRY.end(cid)


def watch_file_access(cid: str, on_end: Callable[[], None]) -> Callable[[], None]:
    """Call ``on_end`` (from any thread) when the file access of ``cid`` ends; returns the way to stop
    watching."""
    return _REGISTRY.watch(cid, on_end)


def file_access_count(cid: str) -> int:
    """Live sessions and watchers of ``cid`` (for tests and diagnostics)."""
    return _REGISTRY.count(cid)


class ForkServer:
    """``python -m corral.node.fileworker``, started on first use (and again if it ended)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = worker_env(dict(os.environ))
        with theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "corral.node.fileworker"],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
                env=env,
            )
        self._control = ours
        return ours

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ensure(self) -> None:
        """Start the fork server now if it does not run (a process start: call it off the event loop)."""
        with self._lock:
            if self._control is None or not self.running():
                self.close_locked()
                self._start()

    def spawn(self, userns: int, root: int, procs: tuple[int, ...] = ()) -> socket.socket:
        """A session socket to a new worker for the sandbox whose namespace and root these fds are (and
        whose cgroups these ``cgroup.procs`` files, opened for writing, are: the worker joins them)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                for attempt in range(2):
                    control = self._control
                    if control is None or self._proc is None or self._proc.poll() is not None:
                        self.close_locked()
                        control = self._start()
                    try:
                        socket.send_fds(control, [b"s"], [theirs.fileno(), root, userns, *procs])
                        break
                    except OSError:
                        self.close_locked()
                        if attempt:
                            raise WorkerUnavailable("the file service is not available") from None
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    def close_locked(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0 if self._proc.poll() is not None else 2)
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


_SERVER = ForkServer()


def fork_server() -> ForkServer:
    return _SERVER


def _spawn(files: SandboxFiles, owner: _Tracked) -> socket.socket:
    """A worker's session socket, ``owner`` tracked under ``files.cid`` from before the sandbox's fds are
    opened (an end meanwhile is seen: ``not_running``)."""
    _REGISTRY.add(owner)
    try:
        procs = _cgroup_procs(files.cgroups)
        try:
            userns, root = files.worker_fds()
            try:
                sock = _SERVER.spawn(userns, root, procs)
            finally:
                os.close(userns)
                os.close(root)
        finally:
            for fd in procs:
                os.close(fd)
        with _REGISTRY.lock:
            if not owner.ended:
                owner._tracked_sock = sock
                return sock
        sock.close()
        raise FileError("not_running", "the sandbox is not running")
    except BaseException:
        _untrack(owner)
        raise


def _cgroup_procs(dirs: tuple[str, ...]) -> tuple[int, ...]:
    """The ``cgroup.procs`` files of the sandbox's cgroups, opened for writing by the host (a worker writes
    its PID there before it serves: its CPU, memory and PIDs count against the sandbox's limits)."""
    opened: list[int] = []
    try:
        for path in dirs:
            opened.append(os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
    except OSError as exc:
        for fd in opened:
            os.close(fd)
        raise FileError("not_running", "the sandbox is not running") from exc
    return tuple(opened)


def _untrack(owner: _Tracked) -> None:
    """Forget ``owner`` and close its pidfd (its socket is closed by its owner, after this)."""
    with _REGISTRY.lock:
        _REGISTRY.remove(owner)
        owner._tracked_sock = None
        if owner._pidfd >= 0:
            os.close(owner._pidfd)
            owner._pidfd = -1


def _adopt(owner: _Tracked, pidfd: int) -> None:
    """Keep the worker's pidfd; a worker whose sandbox ended meanwhile is killed at once."""
    with _REGISTRY.lock:
        owner._pidfd = pidfd
        if owner.ended:
            owner.end_locked()


def _reply(header: dict[str, Any]) -> dict[str, Any]:
    if header.get("ok") is True:
        return header
    err, kind, message = header.get("errno"), header.get("kind"), str(header.get("message", "failed"))
    if isinstance(err, int) and err:
        raise OSError(err, message)
    raise FileError(kind if isinstance(kind, str) and kind else "invalid", message)


def _hello(data: bytes, fds: list[int]) -> tuple[int, int]:
    if len(data) != _HELLO.size or len(fds) != 1 or not (pid := _HELLO.unpack(data)[0]):
        for fd in fds:
            os.close(fd)
        raise FileError("not_running", "the sandbox is not running")
    return pid, fds[0]


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


class AsyncSession(_Tracked):
    """One worker, driven from the event loop; one call at a time (callers queue)."""

    def __init__(self, files: SandboxFiles, timeout: float) -> None:
        super().__init__(files.cid)
        self._sock = _spawn(files, self)
        self.timeout = timeout
        self.pid = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._busy = False
        self._dead = False

    @classmethod
    async def start(cls, files: SandboxFiles, deadline_s: float = DEFAULT_TIMEOUT_S) -> AsyncSession:
        """A worker for ``files``' sandbox, ready (``FileError`` ``not_running`` when it is gone)."""
        if not _SERVER.running():  # the first session (or after the fork server ended): start it in a thread
            await asyncio.get_running_loop().run_in_executor(None, _SERVER.ensure)
        session = cls(files, deadline_s)
        try:
            await session._begin()
        except BaseException:
            session.close()
            raise
        return session

    async def _begin(self) -> None:
        self._sock.setblocking(False)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout):
            while True:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(self._sock, _HELLO.size, 1)
                    break
                except BlockingIOError:
                    ready: asyncio.Future[None] = loop.create_future()
                    loop.add_reader(self._sock.fileno(), _wake, ready)
                    try:
                        await ready
                    finally:
                        loop.remove_reader(self._sock.fileno())
        self.pid, pidfd = _hello(data, fds)
        _adopt(self, pidfd)
        if self.ended:
            raise FileError("not_running", "the sandbox is not running")
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)

    def kill(self) -> None:
        """End the worker now (it may be blocked in the kernel); the session is over."""
        self._dead = True
        with _REGISTRY.lock:
            if self._pidfd >= 0:
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    async def call(
        self, header: dict[str, Any], data: bytes = b"", *, deadline_s: float | None = None
    ) -> tuple[dict[str, Any], bytes]:
        """Send a request; its reply (an ``OSError`` or ``FileError`` for a failure the worker reports)."""
        async with self._lock:
            if self.ended:
                raise FileError("not_running", "the sandbox is not running")
            if self._dead or self._reader is None or self._writer is None:
                raise WorkerUnavailable("the file session has ended")
            self._busy = True
            try:
                async with asyncio.timeout(self.timeout if deadline_s is None else deadline_s):
                    self._writer.write(fileproto.encode(header, data))
                    await self._writer.drain()
                    text_len, data_len = fileproto.sizes(
                        await self._reader.readexactly(fileproto.HEADER.size)
                    )
                    text = await self._reader.readexactly(text_len)
                    payload = await self._reader.readexactly(data_len) if data_len else b""
            except TimeoutError:
                self.kill()
                raise WorkerUnavailable(f"the sandbox did not answer {header.get('op')} in time") from None
            except (asyncio.IncompleteReadError, ConnectionError, OSError, fileproto.ProtocolError):
                self.kill()
                if self.ended:
                    raise FileError("not_running", "the sandbox is not running") from None
                raise WorkerUnavailable("the file session ended") from None
            except BaseException:
                self.kill()  # cancelled mid-frame: the stream is out of step
                raise
            finally:
                self._busy = False
        return _reply(fileproto.decode_header(text)), payload

    def close(self) -> None:
        """Close the session: the worker sees the end and exits (removing any unfinished upload); one still
        in a call is killed."""
        if self._busy:
            self.kill()
        self._dead = True
        _untrack(self)
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()


class SyncSession(_Tracked):
    """One worker driven by a thread (blocking calls, each with the deadline)."""

    def __init__(self, files: SandboxFiles, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(files.cid)
        self.timeout = timeout
        self._sock = _spawn(files, self)
        try:
            self._sock.settimeout(timeout)
            data, fds, _flags, _addr = socket.recv_fds(self._sock, _HELLO.size, 1)
            self.pid, pidfd = _hello(data, fds)
            _adopt(self, pidfd)
            if self.ended:
                raise FileError("not_running", "the sandbox is not running")
        except TimeoutError:
            self.close()
            raise WorkerUnavailable("the file worker did not start in time") from None
        except BaseException:
            self.close()
            raise

    def kill(self) -> None:
        with _REGISTRY.lock:
            if self._pidfd >= 0:
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def call(self, header: dict[str, Any], data: bytes = b"") -> tuple[dict[str, Any], bytes]:
        try:
            self._sock.sendall(fileproto.encode(header, data))
            text_len, data_len = fileproto.sizes(self._exactly(fileproto.HEADER.size))
            text = self._exactly(text_len)
            payload = self._exactly(data_len) if data_len else b""
        except TimeoutError:
            self.kill()
            raise WorkerUnavailable(f"the sandbox did not answer {header.get('op')} in time") from None
        except (ConnectionError, OSError, fileproto.ProtocolError, EOFError):
            self.kill()
            if self.ended:
                raise FileError("not_running", "the sandbox is not running") from None
            raise WorkerUnavailable("the file session ended") from None
        return _reply(fileproto.decode_header(text)), payload

    def _exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        _untrack(self)
        self._sock.close()


@contextlib.contextmanager
def sync_session(files: SandboxFiles, timeout: float = DEFAULT_TIMEOUT_S) -> Iterator[SyncSession]:
    session = SyncSession(files, timeout)
    try:
        yield session
    finally:
        session.close()


def read_small(session: SyncSession, path: str, limit: int = 1 << 20) -> bytes:
    """The first ``limit`` bytes of a regular file of the sandbox (as its root reads it)."""
    _reply_header, data = session.call({"op": "read_small", "path": path, "limit": limit})
    return data


def write_file(
    session: SyncSession, path: str, data: bytes, *, mode: int = 0o644, parents: bool = False
) -> int:
    """Replace the file ``path`` of the sandbox with ``data``, written as its root (nothing kept on failure)."""
    reply, _ = session.call({"op": "put", "path": path, "mode": mode, "parents": parents})
    session.call({"op": "write", "h": reply["h"], "offset": -1}, data)
    done, _ = session.call({"op": "commit", "h": reply["h"]})
    return int(done["size"])
