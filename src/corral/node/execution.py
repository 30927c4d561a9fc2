"""Running one command in a sandbox: its output as it is written, its exit, and a timeout that kills the
whole process tree (everything in the command's session, which the runtime makes it lead)."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

TIMEOUT_EXIT_CODE = 124  # like coreutils' timeout


@dataclass(frozen=True)
class Output:
    stream: str  # stdout | stderr
    data: bytes


@dataclass(frozen=True)
class Exit:
    exit_code: int
    timed_out: bool
    duration_ms: int


Event = Output | Exit


class Spawner(Protocol):
    def spawn_process(
        self,
        cid: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        pid_file: Path | None = None,
    ) -> subprocess.Popen[bytes]: ...

    def sandbox_pids(self, cid: str) -> set[int]: ...


def shell_argv(command: str | Sequence[str]) -> list[str]:
    """A shell string runs under ``/bin/sh -c``; an argv list runs as given."""
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    return list(command)


def _stat_field(pid: int, index: int) -> int | None:
    """A numeric field of /proc/<pid>/stat after the command name: 1 = parent, 2 = group, 3 = session."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[index])
    except (OSError, IndexError, ValueError):
        return None


def _parent_of(pid: int) -> int | None:
    return _stat_field(pid, 1)


def _group_of(pid: int) -> int | None:
    return _stat_field(pid, 2)


def _session_of(pid: int) -> int | None:
    return _stat_field(pid, 3)


def tree_of(leader: int, candidates: set[int], session: int | None = None) -> set[int]:
    """The processes among ``candidates`` in the command's session (``session``, by default ``leader``'s
    own id) or descended from ``leader``."""
    sid = leader if session is None else session
    tree = {p for p in candidates if _session_of(p) == sid}
    for p in candidates - tree:
        q: int | None = p
        for _ in range(64):
            q = _parent_of(q) if q else None
            if q is None or q <= 1:
                break
            if q == leader or q in tree:
                tree.add(p)
                break
    return tree


@dataclass(frozen=True)
class Command:
    """A command's process as the runtime started it: its host pid, and its session and process group
    (the runtime makes it a session of its own; an intermediate process may be the session's id)."""

    pid: int
    session: int | None
    group: int | None


def identify(pid: int | None) -> Command | None:
    if pid is None:
        return None
    return Command(pid, _session_of(pid), _group_of(pid))


def kill_tree(node: Spawner, cid: str, command: Command | int | None, *, deadline_s: float = 10.0) -> None:
    """SIGKILL the command's process group at once (the kernel signals a group atomically with respect to
    fork, so a fork bomb cannot outrun it), then every process of the sandbox still in the command's session
    or descended from it, until none is left."""
    if command is None:
        return
    if isinstance(command, int):
        command = Command(command, command, command)
    end = time.monotonic() + deadline_s
    while True:
        members = node.sandbox_pids(cid)
        group = command.group
        # only a group whose leader is a process of the sandbox: a group made inside it (a group cannot be
        # joined from another session), never one of the host's (the server's own, say) nor a reused id
        if group and group in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        victims = tree_of(command.pid, node.sandbox_pids(cid), command.session)
        if not victims or time.monotonic() > end:
            return
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def run_streaming(
    node: Spawner,
    cid: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
    timeout: float = 60.0,
    stop: threading.Event | None = None,
) -> Iterator[Event]:
    """Run ``args`` in sandbox ``cid``; yield output chunks as they arrive, then one Exit. ``stop`` set (the
    reader went away while this waits in another thread) ends the command within a second."""
    start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="corral-exec-")  # private (0700): the runtime writes the pid file here
    pid_file = Path(tmp) / "pid"
    try:
        proc = node.spawn_process(cid, args, env=env, cwd=cwd, user=user, pid_file=pid_file)
        # learn the command's session at once: a command may exit within milliseconds and leave its
        # children (a fork bomb's first shell does), and only the session still names them then
        leader: Command | None = _await_identity(pid_file, proc)
        timed_out = False
        sel = selectors.DefaultSelector()
        streams = {"stdout": proc.stdout, "stderr": proc.stderr}
        for name, stream in streams.items():
            assert stream is not None
            fd = stream.fileno()
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, name)
        open_fds = len(streams)
        deadline = start + timeout
        try:
            while open_fds:
                if stop is not None and stop.is_set():
                    return  # the command's tree is killed below
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not timed_out:
                    timed_out = True
                    leader = leader or identify(_read_pid(pid_file))
                    kill_tree(node, cid, leader)
                    deadline = time.monotonic() + 2.0  # drain what is left, then stop waiting
                    continue
                if remaining <= 0:
                    break
                for key, _ in sel.select(timeout=min(remaining, 1.0)):
                    try:
                        data = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        sel.unregister(key.fd)
                        open_fds -= 1
                        continue
                    yield Output(str(key.data), data)
                if leader is None:
                    leader = identify(_read_pid(pid_file))
            if not timed_out:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    kill_tree(node, cid, leader or identify(_read_pid(pid_file)))
        finally:
            sel.close()
            if proc.poll() is None:
                # timed out, or the reader went away (client disconnected): end the command's tree, and let
                # the runtime's exec process exit by itself (killing it would leave its child unreaped)
                kill_tree(node, cid, leader or identify(_read_pid(pid_file)))
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
            code = proc.wait()
        duration = int((time.monotonic() - start) * 1000)
        if timed_out:
            yield Exit(TIMEOUT_EXIT_CODE, True, duration)
        else:
            yield Exit(code if code >= 0 else 128 - code, False, duration)
    finally:
        pid_file.unlink(missing_ok=True)
        os.rmdir(tmp)


def _await_identity(pid_file: Path, proc: subprocess.Popen[bytes], wait_s: float = 0.5) -> Command | None:
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        command = identify(_read_pid(pid_file))
        if command is not None and command.session is not None:
            return command
        if proc.poll() is not None:
            return command
        time.sleep(0.0002)
    return None


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
