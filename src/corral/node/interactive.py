"""Interactive processes in a sandbox, for the SSH gateway, the terminal and the shell: a command started
through the sandbox's corral-init with its stdin too, either on a terminal (a pty opened in the sandbox's own
devpts, so ``tty`` inside names ``/dev/pts/N`` and the slave belongs to the user) or on three pipes.

Everything here is asyncio: the caller pumps ``read``/``write`` and learns the end from ``wait``. Closing the
session before the command ends makes corral-init kill the command's whole session (and the host does too)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import termios
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.node import executors
from corral.node.agent.client import connect_async, encode_request, exit_code, parse_user, send_request
from corral.node.files import SandboxFiles
from corral.runtime.syscalls import file_identity, openat2

TIOCSPTLCK = 0x40045431  # (un)lock a pty master
TIOCGPTPEER = 0x5441  # open the slave of a pty master (Linux >= 4.13), resolved in the master's devpts
READ_SIZE = 65536
MAX_SIZE = 10000  # columns or rows


@dataclass(frozen=True)
class Pty:
    cols: int = 80
    rows: int = 24
    term: str = "xterm-256color"


def winsize(cols: int, rows: int) -> bytes:
    """A ``struct winsize`` (rows, cols, xpixel, ypixel); sizes out of range are clamped to 1..10000."""
    return struct.pack("HHHH", _clamp(rows), _clamp(cols), 0, 0)


def _clamp(n: int) -> int:
    return max(1, min(MAX_SIZE, int(n)))


def open_pty(files: SandboxFiles, uid: int, gid: int) -> tuple[int, int]:
    """A pty pair in the sandbox's devpts (``/dev/pts/ptmx`` inside its root), the slave owned by the sandbox
    user ``uid``:``gid`` (inside ids; the host ids are the sandbox root's plus them). Returns (master, slave)."""
    root = os.open(files.root_dir or f"/proc/{files.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with file_identity(files.uid + uid, files.gid + gid):
            master = openat2(root, "/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(root)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        os.close(master)
        raise
    os.set_inheritable(slave, False)
    return master, int(slave)


class Session:
    """A running interactive command. ``read("stdout"|"stderr")`` returns b"" at the end of that stream (a
    terminal has only stdout: its stderr is the same terminal)."""

    def __init__(
        self,
        conn: socket.socket,
        stdin: int,
        stdout: int,
        stderr: int | None,
        pty: bool,
        kill_session: Callable[[int], None] | None,
    ) -> None:
        self._conn = conn
        self._stdin: int | None = stdin
        self._out: dict[str, int | None] = {"stdout": stdout, "stderr": stderr}
        self.pty = pty
        self._kill_session = kill_session
        self.pid: int | None = None  # the command's pid inside the sandbox
        self._status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._control = asyncio.get_running_loop().create_task(self._read_control())
        self._closed = False

    async def _read_control(self) -> None:
        loop = asyncio.get_running_loop()
        buf = b""
        try:
            while True:
                data = await loop.sock_recv(self._conn, 256)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.startswith(b"pid "):
                        self.pid = int(line[4:])
                    elif line.startswith(b"exit "):
                        self._status.set_result(int(line[5:]))
                        return
                    elif line.startswith(b"error "):
                        raise RuntimeError(line[6:].decode(errors="replace"))
            raise RuntimeError("the sandbox's init dropped the command")
        except BaseException as exc:
            if not self._status.done():
                self._status.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            if not isinstance(exc, (Exception, asyncio.CancelledError)):
                raise

    async def read(self, stream: str = "stdout") -> bytes:
        fd = self._out[stream]
        if fd is None:
            return b""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                await _wait_fd(loop, fd, readable=True)
                continue
            except OSError:  # EIO: a pty whose every slave is closed
                data = b""
            if not data:
                self._close_fd(stream)
            return data

    async def write(self, data: bytes) -> None:
        """Feed stdin; waits while the pipe or terminal is full. Data after the command ended is dropped."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view and self._stdin is not None:
            try:
                n = os.write(self._stdin, view)
            except BlockingIOError:
                await _wait_fd(loop, self._stdin, readable=False)
                continue
            except OSError:  # EPIPE / EIO: nobody reads any more
                return
            view = view[n:]

    def close_stdin(self) -> None:
        """End of input: the pipe closes (a terminal gets its EOF character, as sshd does)."""
        if self._stdin is None:
            return
        if self.pty:
            with contextlib.suppress(OSError):
                os.write(self._stdin, termios.tcgetattr(self._stdin)[6][termios.VEOF])
            return
        os.close(self._stdin)
        self._stdin = None

    def resize(self, cols: int, rows: int) -> None:
        """New window size: the kernel tells the terminal's foreground process group (SIGWINCH)."""
        fd = self._out["stdout"]
        if self.pty and fd is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, termios.TIOCSWINSZ, winsize(cols, rows))

    async def wait(self) -> int:
        """The command's exit code (128 + signal when killed)."""
        return exit_code(await asyncio.shield(self._status))

    @property
    def done(self) -> bool:
        return self._status.done()

    async def close(self) -> None:
        """End the command if it still runs, and release everything."""
        if self._closed:
            return
        self._closed = True
        running = not self._status.done()
        self._control.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._control
        self._conn.close()  # before the end: corral-init kills the command's session
        if running and self._kill_session is not None and self.pid is not None:
            await executors.run(executors.KILLS, self._kill_session, self.pid)
        for stream in ("stdout", "stderr"):
            self._close_fd(stream)
        if self._stdin is not None and not self.pty:
            os.close(self._stdin)
        self._stdin = None

    def _close_fd(self, stream: str) -> None:
        fd = self._out[stream]
        if fd is None:
            return
        self._out[stream] = None
        if self.pty and fd == self._stdin:
            self._stdin = None
        os.close(fd)


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, *, readable: bool) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_reader if readable else loop.add_writer)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_reader if readable else loop.remove_writer)(fd)


async def start(
    sock_path: Path,
    files: SandboxFiles,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    user: str | None,
    pty: Pty | None,
    kill_session: Callable[[int], None] | None = None,
) -> Session:
    """Start ``args`` in the sandbox whose command socket is ``sock_path``; ``pty`` gives it a terminal."""
    uid, gid = parse_user(user)
    full = dict(env)
    if pty is not None:
        full["TERM"] = pty.term or "xterm"
    request = encode_request(args, full, cwd, uid, gid)
    conn = await connect_async(sock_path, request)
    ours: list[int] = []  # our ends, closed on failure
    theirs: list[int] = []  # the command's ends, always closed here once sent
    try:
        if pty is not None:
            master, slave = await executors.run(executors.SESSIONS, open_pty, files, uid, gid)
            ours.append(master)
            theirs.append(slave)
            fcntl.ioctl(master, termios.TIOCSWINSZ, winsize(pty.cols, pty.rows))
            send = [slave, slave, slave]
            stdin, stdout, stderr = master, master, None
        else:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            ours += [in_w, out_r, err_r]
            theirs += [in_r, out_w, err_w]
            send = [in_r, out_w, err_w]
            stdin, stdout, stderr = in_w, out_r, err_r
        await send_request(conn, request, send)
    except BaseException:
        conn.close()
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    for fd in {stdin, stdout, *([stderr] if stderr is not None else [])}:
        os.set_blocking(fd, False)
    conn.setblocking(False)
    return Session(conn, stdin, stdout, stderr, pty is not None, kill_session)
