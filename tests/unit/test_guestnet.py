"""guestnet: connections made in another process's network namespace (a real one, made with ``unshare``)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from corral.node.guestnet import (
    GuestNamespace,
    GuestNetError,
    GuestUnreachable,
    InvalidGuestAddress,
    SandboxDialer,
    SandboxGone,
    guest_address,
    guest_socket,
    open_guest_connection,
)

# In its own network namespace: loopback up, then an echo server on 127.0.0.1 that prefixes what it reads
# with "ns:" and prints its port once it listens.
_ECHO = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    with c:
        data = c.recv(65536)
        c.sendall(b"ns:" + data)
"""


@pytest.fixture(scope="module")
def other_ns() -> Iterator[tuple[int, int]]:
    """(pid, port) of an echo server alone in a new network namespace."""
    proc = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {sys.executable} -c '{_ECHO}'"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), line
    try:
        yield proc.pid, int(line)
    finally:
        proc.kill()
        proc.wait()


def test_reaches_a_server_bound_to_loopback_inside(other_ns: tuple[int, int]) -> None:
    pid, port = other_ns
    before = os.stat("/proc/thread-self/ns/net").st_ino
    with guest_socket(pid, "127.0.0.1", port, 2.0) as sock:
        sock.sendall(b"hello")
        assert sock.recv(100) == b"ns:hello"
        assert sock.gettimeout() is None  # blocking, as a plain connected socket
    assert os.stat("/proc/thread-self/ns/net").st_ino == before  # the caller's namespace is untouched
    # the server is in the other namespace only: the same port on the host's loopback is someone else's
    with socket.socket() as probe:
        probe.settimeout(1)
        try:
            probe.connect(("127.0.0.1", port))
        except OSError:
            pass
        else:
            probe.sendall(b"hello")
            assert probe.recv(100) != b"ns:hello"


def test_a_closed_port_is_unreachable(other_ns: tuple[int, int]) -> None:
    pid, port = other_ns
    closed = port + 1 if port < 65535 else port - 1
    with pytest.raises(GuestUnreachable, match="Connection refused"):
        guest_socket(pid, "127.0.0.1", closed, 2.0)


def test_an_address_with_no_route_is_unreachable(other_ns: tuple[int, int]) -> None:
    pid, _ = other_ns
    with pytest.raises(GuestUnreachable):
        guest_socket(pid, "192.0.2.1", 80, 0.5)  # only loopback exists in there


def test_bad_addresses_are_refused_before_anything_is_opened() -> None:
    for host, port in [("localhost", 80), ("127.0.0.1", 0), ("127.0.0.1", 65536), ("::1", -1), ("", 80)]:
        with pytest.raises(InvalidGuestAddress):
            guest_socket(1, host, port, 1.0)
    assert guest_address("::1", 8080) == (socket.AF_INET6, "::1", 8080)
    assert guest_address("127.0.0.1", 1)[0] == socket.AF_INET
    with pytest.raises(InvalidGuestAddress):
        guest_address("127.0.0.1", True)
    assert issubclass(InvalidGuestAddress, ValueError)


def test_the_servers_own_namespace_is_refused() -> None:
    with pytest.raises(GuestNetError, match="network namespace of its own"):
        guest_socket(os.getpid(), "127.0.0.1", 9, 1.0)


def test_an_exited_process_is_gone_even_through_an_old_handle() -> None:
    proc = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        handle = GuestNamespace(proc.pid)
        assert handle.alive()
    finally:
        proc.kill()
        proc.wait()
    with handle:
        assert not handle.alive()
        with pytest.raises(SandboxGone):
            handle.connect("127.0.0.1", 80)
    with pytest.raises(SandboxGone):
        guest_socket(proc.pid, "127.0.0.1", 80)


def test_a_cgroup_that_does_not_match_is_refused(other_ns: tuple[int, int]) -> None:
    pid, _ = other_ns
    with pytest.raises(SandboxGone):
        GuestNamespace(pid, cgroup="no-such-container-cgroup")
    with open(f"/proc/{pid}/cgroup") as f:
        own = f.read().strip().rsplit("/", 1)[-1]
    if own:
        GuestNamespace(pid, cgroup=own).close()


def test_asyncio_streams(other_ns: tuple[int, int]) -> None:
    pid, port = other_ns

    async def talk() -> bytes:
        reader, writer = await open_guest_connection(pid, "127.0.0.1", port, 2.0)
        writer.write(b"async")
        await writer.drain()
        data = await reader.read(100)
        writer.close()
        await writer.wait_closed()
        return data

    assert asyncio.run(talk()) == b"ns:async"


def _echo_in_new_namespace() -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {sys.executable} -c '{_ECHO}'"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _cgroup_segment(pid: int) -> str:
    """A path segment of the process's cgroups (what the dialer checks a sandbox's init against)."""
    with open(f"/proc/{pid}/cgroup") as f:
        segments = [line.rsplit("/", 1)[-1] for line in f.read().splitlines()]
    found = [s for s in segments if s]
    assert found, "this test needs the test process to be in a cgroup other than the root"
    return found[0]


def test_the_dialer_keeps_a_handle_and_follows_a_new_init() -> None:
    first, port1 = _echo_in_new_namespace()
    second: subprocess.Popen[bytes] | None = None
    asked: list[str] = []
    current: dict[str, int | None] = {"pid": first.pid}

    def pid_of(cid: str) -> int | None:
        asked.append(cid)
        return current["pid"]

    cid = _cgroup_segment(first.pid)
    dialer = SandboxDialer(pid_of)
    try:
        for _ in range(3):
            with dialer.connect(cid, "127.0.0.1", port1, 2.0) as sock:
                sock.sendall(b"x")
                assert sock.recv(10) == b"ns:x"
        assert asked == [cid]  # one runtime question for three connections
        # the sandbox's init is replaced (a VM stopped and started again): the old handle is found dead
        first.kill()
        first.wait()
        second, port2 = _echo_in_new_namespace()
        current["pid"] = second.pid
        with dialer.connect(cid, "127.0.0.1", port2, 2.0) as sock:
            sock.sendall(b"y")
            assert sock.recv(10) == b"ns:y"
        assert asked == [cid, cid]
        with pytest.raises(GuestUnreachable):
            dialer.connect(cid, "127.0.0.1", port2 + 1 if port2 < 65535 else port2 - 1, 2.0)
        # a PID whose process is not in the sandbox's cgroup is refused
        with pytest.raises(SandboxGone):
            dialer.connect("not-this-sandbox", "127.0.0.1", port2, 2.0)
        current["pid"] = None
        second.kill()
        second.wait()
        with pytest.raises(SandboxGone):
            dialer.connect(cid, "127.0.0.1", port2, 2.0)
    finally:
        dialer.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
