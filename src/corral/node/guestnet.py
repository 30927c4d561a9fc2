"""TCP connections from the host to a server inside a sandbox, made in the sandbox's network namespace.

A socket keeps the network namespace it was created in, so a short-lived thread enters the namespace of the
sandbox's init process (``setns``), creates and connects the socket, and ends; the socket is then used from
any thread or event loop of the server. It reaches servers bound to 127.0.0.1 inside the sandbox, and the
calling thread's namespace is never changed.

The process is held by a descriptor of its ``/proc/<pid>`` directory (``GuestNamespace``): once the process
has exited, nothing is found under it any more, even if its PID is given to another process, so a stale
handle cannot lead into another namespace. A namespace that is the server's own is refused: a connection
meant for a sandbox never reaches the host's loopback.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Callable
from types import TracebackType

from corral.node.local import NodeError

CONNECT_TIMEOUT = 5.0


class GuestNetError(NodeError):
    """A connection into a sandbox could not be made; the message is safe to show to the VM's owner."""


class InvalidGuestAddress(GuestNetError, ValueError):
    """The host is not an IP literal, or the port is outside 1..65535."""


class SandboxGone(GuestNetError):
    """The sandbox's init process has exited (the VM stopped)."""


class GuestUnreachable(GuestNetError):
    """Nothing accepted the connection inside the sandbox (refused, timed out, no route)."""


def guest_address(host: str, port: int) -> tuple[socket.AddressFamily, str, int]:
    """(family, host, port) for a connection inside a sandbox, or ``InvalidGuestAddress``."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidGuestAddress(f"port must be between 1 and 65535, not {port!r}")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidGuestAddress(f"host must be an IP address, not {host!r}") from None
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    return family, str(addr), port


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class GuestNamespace:
    """The network namespace of a sandbox's init process, held by its ``/proc/<pid>`` directory (which does
    not keep the namespace alive). ``cgroup``, when given, is a path segment the process's cgroup must
    contain (the container id): a check that the PID is still the sandbox's when the handle is made."""

    def __init__(self, pid: int, *, cgroup: str | None = None) -> None:
        if pid <= 0:
            raise SandboxGone("the sandbox has no init process")
        self.pid = pid
        self._lock = threading.Lock()  # the directory is never closed while another thread opens under it
        try:
            self._dir: int | None = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SandboxGone("the sandbox is not running") from None
        try:
            if cgroup is not None and f"/{cgroup}" not in self._read("cgroup"):
                raise SandboxGone("the sandbox is not running")
        except BaseException:
            self.close()
            raise

    def _read(self, name: str) -> str:
        fd = self._open(name)
        try:
            return os.read(fd, 65536).decode(errors="replace")
        finally:
            os.close(fd)

    def _open(self, name: str) -> int:
        try:
            with self._lock:
                if self._dir is None:
                    raise SandboxGone("the sandbox is not running")
                return os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ESRCH):
                raise SandboxGone("the sandbox is not running") from None
            raise GuestNetError(f"cannot open the sandbox's network namespace: {exc.strerror}") from None

    def alive(self) -> bool:
        try:
            fd = self._open("ns/net")
        except GuestNetError:
            return False
        os.close(fd)
        return True

    def connect(self, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
        """A blocking TCP socket connected to ``host:port`` inside the sandbox."""
        family, addr, port = guest_address(host, port)
        ns = self._open("ns/net")
        try:
            if _same_file(os.fstat(ns), os.stat("/proc/thread-self/ns/net")):
                raise GuestNetError("the process is not in a network namespace of its own")
            return _connect_in(ns, family, addr, port, timeout)
        finally:
            os.close(ns)

    def socket(self, host: str, port: int) -> tuple[socket.socket, tuple[str, int]]:
        """A non-blocking TCP socket made in the sandbox's network namespace, not yet connected, and the
        address to connect it to (``connect_socket``, awaited: a slow guest then holds no thread)."""
        family, addr, port = guest_address(host, port)
        ns = self._open("ns/net")
        try:
            if _same_file(os.fstat(ns), os.stat("/proc/thread-self/ns/net")):
                raise GuestNetError("the process is not in a network namespace of its own")
            return _socket_in(ns, family), (addr, port)
        finally:
            os.close(ns)

    def close(self) -> None:
        with self._lock:
            if self._dir is not None:
                os.close(self._dir)
                self._dir = None

    def __enter__(self) -> GuestNamespace:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _connect_in(ns: int, family: socket.AddressFamily, host: str, port: int, timeout: float) -> socket.socket:
    result: list[socket.socket] = []
    failure: list[BaseException] = []

    def enter_and_connect() -> None:
        try:
            os.setns(ns, os.CLONE_NEWNET)
        except OSError as exc:
            failure.append(GuestNetError(f"cannot enter the sandbox's network namespace: {exc.strerror}"))
            return
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError:
            sock.close()
            failure.append(GuestUnreachable(f"connecting to {host}:{port} in the sandbox timed out"))
        except OSError as exc:
            sock.close()
            why = exc.strerror or type(exc).__name__
            failure.append(GuestUnreachable(f"cannot connect to {host}:{port} in the sandbox: {why}"))
        except BaseException as exc:
            sock.close()
            failure.append(exc)
        else:
            result.append(sock)

    # the thread ends right after, and its namespace with it: no other thread is ever moved
    thread = threading.Thread(target=enter_and_connect, name="corral-guestnet", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _socket_in(ns: int, family: socket.AddressFamily) -> socket.socket:
    """A socket created in namespace ``ns`` by a short-lived thread (creating it never blocks)."""
    result: list[socket.socket] = []
    failure: list[BaseException] = []

    def enter_and_create() -> None:
        try:
            os.setns(ns, os.CLONE_NEWNET)
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            failure.append(GuestNetError(f"cannot open a socket in the sandbox: {exc.strerror}"))
            return
        sock.setblocking(False)
        result.append(sock)

    thread = threading.Thread(target=enter_and_create, name="corral-guestnet", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


async def connect_socket(sock: socket.socket, address: tuple[str, int], timeout: float) -> None:  # noqa: ASYNC109
    """Connect a socket from ``GuestNamespace.socket`` on the event loop (no thread waits for the guest);
    ``GuestUnreachable`` when refused or not accepted within ``timeout``. The socket is closed on failure."""
    host, port = address
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except TimeoutError:
        sock.close()
        raise GuestUnreachable(f"connecting to {host}:{port} in the sandbox timed out") from None
    except OSError as exc:
        sock.close()
        why = exc.strerror or type(exc).__name__
        raise GuestUnreachable(f"cannot connect to {host}:{port} in the sandbox: {why}") from None
    except BaseException:
        sock.close()
        raise


def guest_socket(init_pid: int, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A blocking TCP socket connected to ``host:port`` in the network namespace of process ``init_pid``
    (a sandbox's init). ``InvalidGuestAddress``, ``SandboxGone`` or ``GuestUnreachable`` otherwise."""
    guest_address(host, port)  # bad input fails before any namespace is looked at
    with GuestNamespace(init_pid) as ns:
        return ns.connect(host, port, timeout)


async def open_guest_connection(
    init_pid: int,
    host: str,
    port: int,
    timeout: float = CONNECT_TIMEOUT,  # noqa: ASYNC109 - the connect's, as for guest_socket
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio`` streams over ``guest_socket`` (connected in a worker thread; ``timeout`` bounds the
    connect only)."""
    sock = await asyncio.to_thread(guest_socket, init_pid, host, port, timeout)
    try:
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


class SandboxDialer:
    """Connections into sandboxes by container id. The namespace handle of each sandbox is kept (one open
    ``/proc/<pid>`` directory, which does not keep the namespace alive) so that a connection costs no
    runtime call; a handle whose process has exited is replaced by asking ``pid_of`` again (a VM that was
    stopped and started, resumed or rolled back has a new init), and dropped when its sandbox is gone."""

    def __init__(self, pid_of: Callable[[str], int | None]) -> None:
        self._pid_of = pid_of
        self._handles: dict[str, GuestNamespace] = {}
        self._lock = threading.Lock()

    def connect(self, cid: str, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
        """A blocking socket connected to ``host:port`` in sandbox ``cid`` (blocks: call it from a thread)."""
        guest_address(host, port)
        for fresh in (False, True):
            handle = self._handle(cid, fresh=fresh)
            try:
                return handle.connect(host, port, timeout)
            except SandboxGone:
                self._forget(cid, handle)
        raise SandboxGone("the sandbox is not running")

    def socket(self, cid: str, host: str, port: int) -> tuple[socket.socket, tuple[str, int]]:
        """A socket made in sandbox ``cid``'s namespace, to be connected with ``connect_socket`` (blocks
        briefly: the namespace is looked up and entered by a thread, nothing waits for the guest)."""
        guest_address(host, port)
        for fresh in (False, True):
            handle = self._handle(cid, fresh=fresh)
            try:
                return handle.socket(host, port)
            except SandboxGone:
                self._forget(cid, handle)
        raise SandboxGone("the sandbox is not running")

    def _handle(self, cid: str, *, fresh: bool) -> GuestNamespace:
        with self._lock:
            handle = self._handles.get(cid)
        if handle is not None and not fresh:
            return handle
        pid = self._pid_of(cid)
        if pid is None:
            raise SandboxGone("the sandbox is not running")
        handle = GuestNamespace(pid, cgroup=cid)
        with self._lock:
            old = self._handles.pop(cid, None)
            dead = [key for key, h in self._handles.items() if not h.alive()]
            for key in dead:
                self._handles.pop(key).close()
            self._handles[cid] = handle
        if old is not None and old is not handle:
            old.close()
        return handle

    def _forget(self, cid: str, handle: GuestNamespace) -> None:
        with self._lock:
            if self._handles.get(cid) is handle:
                del self._handles[cid]
        handle.close()

    def close(self) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            handle.close()
