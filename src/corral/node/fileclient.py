"""The host's side of the file workers (``fileworker``): the fork server, started once per process and again
if it ends, and sessions with one worker each, asyncio (``AsyncSession``: the API's routes and SFTP, nothing
held while a worker works) or blocking with a timeout (``SyncSession``: for code already in a thread).

Every call has a deadline; a worker that misses it is killed through its pidfd and the session is over. A
read that blocks in the kernel then costs one killable process, never a server thread or the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
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


class ForkServer:
    """``python -m corral.node.fileworker``, started on first use (and again if it ended)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        package_parent = str(Path(corral.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
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

    def spawn(self, userns: int, root: int) -> socket.socket:
        """A session socket to a new worker for the sandbox whose namespace and root these fds are."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                for attempt in range(2):
                    control = self._control
                    if control is None or self._proc is None or self._proc.poll() is not None:
                        self.close_locked()
                        control = self._start()
                    try:
                        socket.send_fds(control, [b"s"], [theirs.fileno(), root, userns])
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


def _spawn(files: SandboxFiles) -> socket.socket:
    userns, root = files.worker_fds()
    try:
        return _SERVER.spawn(userns, root)
    finally:
        os.close(userns)
        os.close(root)


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


class AsyncSession:
    """One worker, driven from the event loop; one call at a time (callers queue)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self.timeout = timeout
        self.pid = 0
        self._pidfd = -1
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
        session = cls(_spawn(files), deadline_s)
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
        self.pid, self._pidfd = _hello(data, fds)
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)

    def kill(self) -> None:
        """End the worker now (it may be blocked in the kernel); the session is over."""
        self._dead = True
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    async def call(
        self, header: dict[str, Any], data: bytes = b"", *, deadline_s: float | None = None
    ) -> tuple[dict[str, Any], bytes]:
        """Send a request; its reply (an ``OSError`` or ``FileError`` for a failure the worker reports)."""
        async with self._lock:
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
            except (asyncio.IncompleteReadError, ConnectionError, fileproto.ProtocolError):
                self.kill()
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
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


class SyncSession:
    """One worker driven by a thread (blocking calls, each with the deadline)."""

    def __init__(self, files: SandboxFiles, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout = timeout
        self._sock = _spawn(files)
        self._pidfd = -1
        try:
            self._sock.settimeout(timeout)
            data, fds, _flags, _addr = socket.recv_fds(self._sock, _HELLO.size, 1)
            self.pid, self._pidfd = _hello(data, fds)
        except TimeoutError:
            self._sock.close()
            raise WorkerUnavailable("the file worker did not start in time") from None
        except BaseException:
            self._sock.close()
            raise

    def kill(self) -> None:
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
        except (ConnectionError, fileproto.ProtocolError, EOFError):
            self.kill()
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
        self._sock.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


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
