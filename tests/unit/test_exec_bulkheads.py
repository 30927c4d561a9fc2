"""The pure parts of the exec and session bulkheads: settings and their defaults, the caps each bulkhead gets,
the SSH gateway's pre-authentication cap, the bounded pools, and the awaited exec against a stand-in command
server (a unix socket speaking corral-init's protocol; the real one is tested in tests/sandbox)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.api.bulkheads import Bulkheads, exec_scopes, session_scopes, ssh_limits
from corral.config import Settings
from corral.domain.bulkhead import Bulkhead, Caps
from corral.node import executors
from corral.node.agent.client import run_via_agent_async
from corral.node.execution import Exit, Output
from corral.ssh.gateway import SshLimits, _Server

# ---- settings ------------------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = Settings.from_env({"CORRAL_DATA_DIR": "/tmp/x"})
    assert (s.max_execs_per_key, s.max_execs_per_vm, s.max_execs) == (32, 16, 1024)
    assert (s.max_sessions_per_key, s.max_sessions_per_vm) == (32, 16)
    assert (s.ssh_preauth_per_source, s.ssh_preauth_max, s.ssh_login_timeout_s) == (32, 512, 30.0)


def test_settings_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "CORRAL_DATA_DIR": "/tmp/x",
            "CORRAL_MAX_EXECS_PER_KEY": "4",
            "CORRAL_MAX_EXECS_PER_VM": "2",
            "CORRAL_MAX_EXECS": "100",
            "CORRAL_MAX_EXECS_PER_USER": "9",
            "CORRAL_MAX_SESSIONS_PER_KEY": "5",
            "CORRAL_MAX_SESSIONS_PER_VM": "3",
            "CORRAL_SSH_PREAUTH_PER_SOURCE": "6",
            "CORRAL_SSH_PREAUTH_MAX": "60",
            "CORRAL_SSH_LOGIN_TIMEOUT_S": "7.5",
        }
    )
    heads = Bulkheads.from_settings(s)
    assert heads.execs.caps.per == {"key": 4, "user": 9, "vm": 2, "all": 100}
    assert heads.sessions.caps.per == {"key": 5, "user": 5, "vm": 3}
    assert heads.ssh_preauth.caps.per == {"source": 6, "all": 60}
    limits = ssh_limits(heads, s)
    assert limits.preauth is heads.ssh_preauth
    assert limits.sessions is heads.sessions  # SSH sessions count with terminals and shells
    assert limits.login_timeout == 7.5


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CORRAL_MAX_EXECS_PER_KEY", "0"),
        ("CORRAL_MAX_EXECS_PER_VM", "many"),
        ("CORRAL_SSH_LOGIN_TIMEOUT_S", "-1"),
    ],
)
def test_bad_settings_are_refused(name: str, value: str) -> None:
    with pytest.raises(SystemExit, match=name):
        Settings.from_env({"CORRAL_DATA_DIR": "/tmp/x", name: value})


def test_an_exec_counts_against_its_key_its_vm_and_the_server() -> None:
    execs = Bulkheads.from_settings(Settings.from_env({"CORRAL_DATA_DIR": "/tmp/x"})).execs
    for n in range(16):
        execs.acquire(exec_scopes("key_a", "u_a", "vm_1"))
        assert execs.in_use(("vm", "vm_1")) == n + 1
    assert execs.try_acquire(exec_scopes("key_a", "u_a", "vm_1")) == ("vm", "vm_1")
    assert execs.try_acquire(exec_scopes("key_b", "u_a", "vm_1")) == (
        "vm",
        "vm_1",
    )  # the VM is full for anyone
    assert execs.try_acquire(exec_scopes("key_a", "u_a", "vm_2")) is None  # the key has room on another VM
    assert execs.in_use(("all", "")) == 17
    assert session_scopes("key_a", "u_a", "vm_1") == [("key", "key_a"), ("user", "u_a"), ("vm", "vm_1")]


def test_one_account_with_many_keys_cannot_fill_the_server_exec_cap() -> None:
    execs = Bulkheads.from_settings(Settings.from_env({"CORRAL_DATA_DIR": "/tmp/x"})).execs
    taken = 0
    for k in range(40):  # keys are free: 40 keys of account u_a, 16 VMs, 4 execs per key
        for v in range(4):
            if execs.try_acquire(exec_scopes(f"key_{k}", "u_a", f"vm_{(k * 4 + v) % 16}")) is None:
                taken += 1
    assert taken == 64  # the account's cap, not the server's 1024
    assert execs.try_acquire(exec_scopes("key_x", "u_a", "vm_99")) == ("user", "u_a")
    for n in range(15):  # 15 more accounts at their cap: 16 x 64 = 1024
        for i in range(64):
            assert execs.try_acquire(exec_scopes(f"k{n}_{i}", f"u{n}", f"v{n}_{i % 16}")) is None
    assert execs.in_use(("all", "")) == 1024
    sessions = Bulkheads.from_settings(Settings.from_env({"CORRAL_DATA_DIR": "/tmp/x"})).sessions
    for k in range(32):
        assert sessions.try_acquire(session_scopes(f"key_{k}", "u_a", f"vm_{k % 16}")) is None
    assert sessions.try_acquire(session_scopes("key_new", "u_a", "vm_new")) == ("user", "u_a")


def test_file_operations_count_per_account() -> None:
    from corral.api.routers.files import FileLimits, _scopes

    downloads = FileLimits.from_settings(Settings.from_env({"CORRAL_DATA_DIR": "/tmp/x"})).downloads
    taken = sum(downloads.try_acquire(_scopes(f"key_{k}", "u_a", f"vm_{k}")) is None for k in range(40))
    assert taken == 32  # 40 free keys on 40 VMs: the account's cap
    assert downloads.try_acquire(_scopes("key_b", "u_b", "vm_b")) is None  # another account is not affected


# ---- the SSH gateway's pre-authentication cap ----------------------------------------------------------------


def test_ipv6_sources_count_per_64() -> None:
    from corral.ssh.gateway import source_of

    assert source_of("2001:db8:1:2::5") == source_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::5") != source_of("2001:db8:1:2::5")
    assert source_of("::ffff:127.0.0.2") == "127.0.0.2"
    assert source_of("127.0.0.3") == "127.0.0.3"
    assert source_of("fe80::1%eth0") == "fe80::/64"


class _Conn:
    def __init__(self, source: str) -> None:
        self.source = source
        self.aborted = False

    def get_extra_info(self, name: str) -> Any:
        assert name == "peername"
        return (self.source, 40000)

    def abort(self) -> None:
        self.aborted = True


def test_preauth_connections_beyond_the_cap_are_closed_and_slots_come_back() -> None:
    async def scenario() -> None:
        limits = SshLimits(preauth=Bulkhead("SSH login", Caps({"source": 2, "all": 3})))
        servers = [_Server(None, limits) for _ in range(5)]  # type: ignore[arg-type]
        conns = [_Conn(src) for src in ("10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3")]
        for server, conn in zip(servers, conns, strict=True):
            server.connection_made(conn)  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the abort is scheduled after asyncssh's own set-up
        # the third from one source, and the fifth overall (the total of 3 is reached by then)
        assert [c.aborted for c in conns] == [False, False, True, False, True]
        servers[0].connection_lost(None)  # a connection that goes gives its slot back (once)
        servers[0].connection_lost(None)
        servers[1]._end_preauth()  # logged in: no longer pre-auth
        again = _Conn("10.0.0.1")
        _Server(None, limits).connection_made(again)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert not again.aborted
        assert limits.preauth.in_use(("source", "10.0.0.1")) == 1
        assert limits.preauth.in_use(("all", "")) == 2

    asyncio.run(scenario())


# ---- bounded pools -------------------------------------------------------------------------------------------


def test_a_saturated_pool_or_default_executor_does_not_delay_another_pool() -> None:
    release = threading.Event()

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        blockers = [loop.run_in_executor(None, release.wait) for _ in range(64)]  # the default executor
        blockers += [
            asyncio.ensure_future(executors.run(executors.SSH_AUTH, release.wait))
            for _ in range(executors.SIZES[executors.SSH_AUTH] + 4)
        ]
        await asyncio.sleep(0.05)
        start = time.monotonic()
        assert await asyncio.wait_for(executors.run(executors.SESSIONS, os.getpid), 5) == os.getpid()
        elapsed = time.monotonic() - start
        release.set()
        await asyncio.gather(*blockers)
        return elapsed

    assert asyncio.run(scenario()) < 1.0


def test_iterate_closes_a_blocking_iterator_only_once_its_pending_next_returned() -> None:
    stop = threading.Event()
    closed = threading.Event()

    def slow() -> Iterator[int]:
        try:
            yield 1
            while not stop.is_set():  # a command that writes nothing
                time.sleep(0.01)
            yield 2
        finally:
            closed.set()

    async def scenario() -> list[int]:
        got: list[int] = []
        items = executors.iterate(executors.EXEC_RUNTIME, slow(), on_close=stop.set)
        async for item in items:
            got.append(item)
            break
        reader = asyncio.ensure_future(items.__anext__())
        await asyncio.sleep(0.05)  # the next is pending in the pool
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await items.aclose()
        return got

    assert asyncio.run(scenario()) == [1]
    assert closed.wait(5), "the blocking iterator was not closed"
    assert stop.is_set()


# ---- the awaited exec against a stand-in command server -------------------------------------------------------


class _CommandServer:
    """Accepts one connection, takes the request and the two fds, writes ``out`` to stdout, then either
    reports ``exit`` or waits until the host closes the connection (``hang``)."""

    def __init__(self, path: Path, out: bytes, *, hang: bool = False) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.out, self.hang = out, hang
        self.request = b""
        self.blocking: bool | None = None
        self.host_closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
            self.request = msg
            stdout, stderr = fds
            self.blocking = os.get_blocking(stdout) and os.get_blocking(stderr)
            os.write(stdout, self.out)
            os.write(stderr, b"warn\n")
            conn.sendall(b"pid 42\n")
            if self.hang:
                os.close(stdout)
                os.close(stderr)
                if conn.recv(16) == b"":  # the host hung up: corral-init kills the session here
                    self.host_closed.set()
                return
            os.close(stdout)
            os.close(stderr)
            conn.sendall(b"exit 768\n")  # exit status 3

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def test_awaited_exec_reads_output_and_exit(tmp_path: Path) -> None:
    server = _CommandServer(tmp_path / "agent.sock", b"hello\n")

    async def scenario() -> list[Output | Exit]:
        events = run_via_agent_async(
            tmp_path / "agent.sock", ["echo", "hello"], env={"A": "1"}, cwd="/", user=None, timeout=10
        )
        return [event async for event in events]

    try:
        events = asyncio.run(scenario())
    finally:
        server.close()
    assert b"echo\0hello\0" in server.request
    outputs = {(e.stream, e.data) for e in events if isinstance(e, Output)}
    assert outputs == {("stdout", b"hello\n"), ("stderr", b"warn\n")}
    last = events[-1]
    assert isinstance(last, Exit)
    assert (last.exit_code, last.timed_out) == (3, False)


def test_awaited_exec_gives_the_command_blocking_pipes_and_reads_a_big_output(tmp_path: Path) -> None:
    """A command's stdout must block when the pipe is full: a non-blocking one gets EAGAIN after 64 KiB and
    the output is cut (as `head -c 1M /dev/zero | tr` was)."""
    server = _CommandServer(tmp_path / "agent.sock", b"a" * (1 << 20))

    async def scenario() -> int:
        events = run_via_agent_async(tmp_path / "agent.sock", ["big"], env={}, cwd="/", user=None, timeout=10)
        return sum([len(e.data) async for e in events if isinstance(e, Output) and e.stream == "stdout"])

    try:
        assert asyncio.run(scenario()) == 1 << 20
    finally:
        server.close()
    assert server.blocking is True


def test_awaited_exec_that_is_abandoned_hangs_up_and_kills_the_session(tmp_path: Path) -> None:
    server = _CommandServer(tmp_path / "agent.sock", b"started\n", hang=True)
    killed: list[int] = []

    async def scenario() -> None:
        events = run_via_agent_async(
            tmp_path / "agent.sock",
            ["sleep", "60"],
            env={},
            cwd="/",
            user=None,
            timeout=60,
            kill_session=killed.append,
            background=lambda kill, pid: kill(pid),
        )

        async def consume() -> None:
            async for _ in events:
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.3)  # it runs: output read, pid known
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(scenario())
        assert server.host_closed.wait(5), "the connection to the command server stayed open"
    finally:
        server.close()
    assert killed == [42]


def test_awaited_exec_times_out(tmp_path: Path) -> None:
    server = _CommandServer(tmp_path / "agent.sock", b"", hang=True)
    killed: list[int] = []

    async def scenario() -> list[Output | Exit]:
        events = run_via_agent_async(
            tmp_path / "agent.sock",
            ["sleep", "60"],
            env={},
            cwd="/",
            user=None,
            timeout=0.3,
            kill_session=killed.append,
            background=lambda kill, pid: kill(pid),
        )
        return [event async for event in events]

    try:
        events = asyncio.run(scenario())
    finally:
        server.close()
    last = events[-1]
    assert isinstance(last, Exit)
    assert (last.exit_code, last.timed_out) == (124, True)
    assert killed == [42]
