"""The SSH gateway: one asyncssh server on the host for every sandbox of the node, so a stock OpenSSH client
logs into a sandbox with the private key of the VM's ``public_key`` and nothing runs sshd inside.

``ssh -p <port> <vm id>@<host>``: the user name picks the VM, the VM's ``public_key`` is the only key it
accepts, and the session is root's in the sandbox: an interactive shell on a terminal (window size changes
follow), a command with its exit status, the SFTP subsystem (``sftp``, and ``scp``, which speaks SFTP), and
``-L`` forwarding to ports inside the sandbox (made in the sandbox's own network namespace, so a server bound
to its 127.0.0.1 is reachable). Remote forwarding, agent and X11 forwarding are refused."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncssh
from asyncssh.forward import SSHForwarder

from corral.domain.bulkhead import Bulkhead, Caps, Scope
from corral.domain.errors import CorralError
from corral.domain.vm_states import Detail
from corral.node import executors
from corral.node.files import SandboxFiles
from corral.node.guestnet import GuestUnreachable, guest_socket
from corral.node.interactive import Pty, Session

log = logging.getLogger("corral.ssh")
logging.getLogger("asyncssh").setLevel(logging.WARNING)

HOST_KEY = "ssh_host_ed25519_key"
SHELL = "if [ -x /bin/bash ]; then exec /bin/bash -l; else exec /bin/sh -l; fi"  # a login shell
PASSED_ENV = ("LANG", "LANGUAGE", "COLORTERM")  # what a client may set (sshd's usual AcceptEnv), with LC_*
DRAIN_S = 1.0  # after the command's exit, how long output left in the pipes may take to arrive
DEFAULT_EXECUTOR_THREADS = 8  # the gateway loop's default executor (asyncssh's own use, SFTP's file I/O)


@dataclass(frozen=True)
class Target:
    """A VM an SSH connection is logged into (running when it logged in)."""

    vm_id: str
    user_id: str
    cid: str


class Backend:
    """What the gateway needs from the rest of Corral (the lifecycle and the store), as plain callables so
    tests can stand in for them."""

    def __init__(
        self,
        find_key: Callable[[str], tuple[str, str] | None],
        target: Callable[[str, str], Target | str],
        start: Callable[[Target, list[str], dict[str, str], Pty | None], Awaitable[Session]],
        files: Callable[[Target], tuple[SandboxFiles, int]],
    ) -> None:
        self.find_key = find_key  # vm id -> (user id, public key) of a VM that is not destroyed, else None
        self.target = target  # (user id, vm id) -> the running VM, or why it cannot be used now
        self.start = start  # start a command in a VM: argv, extra environment, terminal
        # the VM's files as it runs now, its root held open (the fd, to close), checked to be the VM's
        self.files = files


@dataclass(frozen=True)
class SshLimits:
    """Bulkheads of the gateway: connections not logged in yet (per source address and in total: beyond
    them a new connection is closed at once), sessions (shells, commands) per account and per VM; and how
    long a connection may take to log in."""

    preauth: Bulkhead = field(default_factory=lambda: Bulkhead("SSH login", Caps({"source": 32, "all": 512})))
    sessions: Bulkhead = field(
        default_factory=lambda: Bulkhead("interactive session", Caps({"user": 32, "vm": 16}))
    )
    login_timeout: float = 30.0


def load_or_create_host_key(data_dir: Path) -> asyncssh.SSHKey:
    path = data_dir / HOST_KEY
    if path.exists():
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.export_private_key())
    os.replace(tmp, path)
    return key


def same_key(authorized: str, offered: asyncssh.SSHKey) -> bool:
    try:
        return asyncssh.import_public_key(authorized).public_data == offered.public_data
    except (asyncssh.KeyImportError, ValueError):
        return False


def client_env(requested: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in requested.items() if k in PASSED_ENV or k.startswith("LC_")}


class _Server(asyncssh.SSHServer):
    def __init__(self, backend: Backend, limits: SshLimits) -> None:
        self.backend = backend
        self.limits = limits
        self._preauth: list[Scope] | None = None  # the pre-authentication slots this connection holds
        self.conn: asyncssh.SSHServerConnection | None = None
        self.owner: tuple[str, str] | None = None  # (user id, public key) of the VM named as the user name
        self.vm_id = ""
        self.target: Target | None = None
        self.found: Target | str | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername")
        scopes: list[Scope] = [("source", source_of(str(peer[0])) if peer else "unknown"), ("all", "")]
        full = self.limits.preauth.try_acquire(scopes)
        if full is not None:
            log.warning(
                "ssh: refused a connection from %s: %s connections not logged in yet",
                scopes[0][1],
                "too many" if full[0] == "source" else "the gateway has too many",
            )
            asyncio.get_running_loop().call_soon(conn.abort)  # after asyncssh's own set-up returns
            return
        self._preauth = scopes

    def _end_preauth(self) -> None:
        if self._preauth is not None:
            self.limits.preauth.release(self._preauth)
            self._preauth = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_preauth()

    async def begin_auth(self, username: str) -> bool:
        self.vm_id = username
        self.owner = await executors.run(executors.SSH_AUTH, self.backend.find_key, username)
        return True

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if self.owner is None or username != self.vm_id or not same_key(self.owner[1], key):
            return False
        # the VM as it is now, for auth_completed (which asyncssh does not await on a server) to act on; once
        # per connection (the client offers the key, then signs with it)
        if self.found is None:
            self.found = await executors.run(
                executors.SSH_AUTH, self.backend.target, self.owner[0], self.vm_id
            )
        return True

    def auth_completed(self) -> None:
        self._end_preauth()
        if isinstance(self.found, str):
            assert self.conn is not None
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, self.found)
            return
        self.target = self.found

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Awaitable[asyncssh.SSHTCPSession[bytes]] | bool:
        """``ssh -L``: to a port inside the sandbox (its loopback or its own address), never the host's."""
        if self.target is None or dest_host not in ("localhost", "127.0.0.1", "::1"):
            return False
        return cast(Awaitable[asyncssh.SSHTCPSession[bytes]], self._forward(self.target, dest_port))

    async def _forward(self, target: Target, port: int) -> SSHForwarder:
        try:
            sock = await executors.run(executors.SESSIONS, self._guest_socket, target, port)
        except (GuestUnreachable, CorralError) as exc:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
        loop = asyncio.get_running_loop()
        _, peer = await loop.create_connection(SSHForwarder, sock=sock)
        return SSHForwarder(peer)

    def _guest_socket(self, target: Target, port: int) -> socket.socket:
        files, root = self.backend.files(target)  # the VM's init now (it may have been restarted)
        try:
            return guest_socket(files.pid, "127.0.0.1", port, 5.0)
        finally:
            os.close(root)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False  # no listening on the host for a sandbox (-R)

    def unix_connection_requested(self, dest_path: str) -> bool:
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        return False


async def _pump_in(process: asyncssh.SSHServerProcess[bytes], session: Session) -> None:
    while True:
        try:
            data = await process.stdin.read(65536)
        except asyncssh.TerminalSizeChanged as change:
            session.resize(change.width, change.height)
            continue
        except (asyncssh.BreakReceived, asyncssh.SignalReceived):
            continue
        if not data:
            session.close_stdin()
            return
        await session.write(data)


async def _pump_out(session: Session, stream: str, writer: asyncssh.SSHWriter[bytes]) -> None:
    while data := await session.read(stream):
        writer.write(data)
        await writer.drain()


async def run_process(process: asyncssh.SSHServerProcess[bytes], backend: Backend) -> None:
    """One session channel: a shell or a command, on a terminal when the client asked for one."""
    try:
        await _run_process(process, backend)
    except Exception:
        log.exception("ssh session failed")
        process.exit(255)


async def _run_process(process: asyncssh.SSHServerProcess[bytes], backend: Backend) -> None:
    server = process.get_extra_info("connection").get_owner()
    assert isinstance(server, _Server)
    assert server.target is not None
    if process.subsystem:
        process.stderr.write(f"corral: subsystem {process.subsystem} is not available\r\n".encode())
        process.exit(1)
        return
    term = process.term_type
    cols, rows, _, _ = process.term_size
    pty = Pty(cols or 80, rows or 24, term) if term else None
    argv = ["/bin/sh", "-c", process.command] if process.command is not None else ["/bin/sh", "-c", SHELL]
    scopes: list[Scope] = [("user", server.target.user_id), ("vm", server.target.vm_id)]
    full = server.limits.sessions.try_acquire(scopes)
    if full is not None:
        where = "your account" if full[0] == "user" else "this VM"
        process.stderr.write(f"corral: {where} has too many sessions open; retry when one ends\r\n".encode())
        process.exit(255)
        return
    try:
        await _run_session(process, backend, server.target, argv, pty)
    finally:
        server.limits.sessions.release(scopes)


async def _run_session(
    process: asyncssh.SSHServerProcess[bytes],
    backend: Backend,
    target: Target,
    argv: list[str],
    pty: Pty | None,
) -> None:
    try:
        session = await backend.start(target, argv, client_env(dict(process.env)), pty)
    except Exception as exc:  # the sandbox stopped meanwhile, or its command server is gone
        log.info("ssh session for %s failed to start: %s", target.vm_id, exc)
        process.stderr.write(f"corral: cannot start a session: {exc}\r\n".encode())
        process.exit(255)
        return
    inbound = asyncio.create_task(_pump_in(process, session))
    outbound = [asyncio.create_task(_pump_out(session, "stdout", process.stdout))]
    if not session.pty:
        outbound.append(asyncio.create_task(_pump_out(session, "stderr", process.stderr)))
    exited = asyncio.ensure_future(session.wait())
    gone = asyncio.ensure_future(process.channel.wait_closed())
    try:
        await asyncio.wait({exited, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not exited.done():  # the client went away first: what it ran ends (below)
            return
        code = exited.result()
        _, pending = await asyncio.wait(outbound, timeout=DRAIN_S)
        for task in pending:
            task.cancel()
        if code > 128 and code - 128 in signal.valid_signals():
            process.exit_with_signal(signal.Signals(code - 128).name.removeprefix("SIG"))
        else:
            process.exit(code)
    except (asyncssh.Error, OSError, RuntimeError) as exc:
        log.info("ssh session for %s ended: %s", target.vm_id, exc)
        process.exit(255)
    finally:
        for waiting in (exited, gone):
            waiting.cancel()
        for task in (inbound, *outbound):
            task.cancel()
        await session.close()


class SshGateway:
    def __init__(
        self,
        backend: Backend,
        host_key: asyncssh.SSHKey,
        sftp: Callable[
            [asyncssh.SSHServerChannel[bytes], SandboxFiles, Callable[[], None]], asyncssh.SFTPServer
        ]
        | None,
        limits: SshLimits | None = None,
    ) -> None:
        self.backend = backend
        self.host_key = host_key
        self.sftp = sftp
        self.limits = limits or SshLimits()
        self._server: asyncssh.SSHAcceptor | None = None
        self._loop: _LoopThread | None = None

    @property
    def public_key(self) -> str:
        """The host key as a known_hosts key (``ssh-ed25519 AAAA...``)."""
        return self.host_key.export_public_key().decode().strip()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.get_port())

    async def start(self, host: str, port: int) -> None:
        """Listen, on an event loop of the gateway's own (in a thread, with its own bounded default executor):
        nothing the API's loop or its executor waits on (a stalled upload, a slow request) delays a login, and
        asyncssh's own use of the default executor (at each login) stays within the gateway's."""
        self._loop = _LoopThread("corral-ssh", DEFAULT_EXECUTOR_THREADS)
        await self._loop.call(self._listen(host, port))
        log.info("SSH gateway listening on %s:%d", host, self.port)

    async def _listen(self, host: str, port: int) -> None:
        def sftp_factory(chan: asyncssh.SSHServerChannel[bytes]) -> asyncssh.SFTPServer:
            server = chan.get_connection().get_owner()
            assert isinstance(server, _Server)
            assert server.target is not None
            assert self.sftp is not None
            files, root = self.backend.files(server.target)
            return self.sftp(chan, files, lambda: os.close(root))

        self._server = await asyncssh.listen(
            host,
            port,
            server_factory=lambda: _Server(self.backend, self.limits),
            server_host_keys=[self.host_key],
            process_factory=lambda process: run_process(process, self.backend),
            sftp_factory=sftp_factory if self.sftp is not None else None,
            allow_scp=False,
            encoding=None,
            agent_forwarding=False,
            x11_forwarding=False,
            line_editor=False,
            keepalive_interval=30,
            login_timeout=self.limits.login_timeout,
        )

    async def close(self) -> None:
        if self._loop is not None:
            await self._loop.call(self._shutdown())
            await self._loop.stop()
            self._loop = None

    async def _shutdown(self) -> None:
        """Stop listening, then end every connection and session still open (their commands are killed)."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


class _LoopThread:
    """An asyncio event loop running in a thread of its own, its default executor bounded to ``workers``."""

    def __init__(self, name: str, workers: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(ThreadPoolExecutor(workers, thread_name_prefix=f"{name}-default"))
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()

    async def call[T](self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this loop and await its result from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.get_running_loop().run_in_executor(None, self.thread.join, 15)


def unusable(detail: Detail) -> str:
    """Why a VM in state ``detail`` cannot take an SSH session (told to the client at disconnect)."""
    return (
        f"the VM is {detail.value}, not running: start it first (corral vm start / POST /v1/vms/{{id}}/start)"
    )


def source_of(address: str) -> str:
    """The pre-auth bulkhead's source of a peer address: an IPv6 address counts per /64 (one client holds a
    whole /64, so per address it would have 2**64 sources); IPv4 and IPv4-mapped addresses per address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)
