"""The one thin function that runs a host command, and the error it raises. Everything else builds argv as data."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


class CommandFailed(RuntimeError):
    """A host command exited non-zero. ``stderr`` is kept for the operator's log, never shown to API users."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(
            f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed ({returncode}): {stderr.strip()}"
        )
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


def private_null(directory: Path) -> Path:
    """A null device node of our own in ``directory`` (made, or made again if it is not one).

    The runtimes hand a sandbox's processes their stdio and, when it is not a terminal, chown it to the
    sandbox's root (crun does on create, restore and exec). Given the host's /dev/null, that made the host's
    /dev/null belong to the sandboxes' root id, and root inside a sandbox (whose /dev/null is the same inode)
    could then chmod it: every program on the host would have lost /dev/null. Runtime commands get this node
    instead; what a sandbox does to it touches only other runtime commands' stdio, which root opens anyway.
    The directory must allow device nodes (not on a ``nodev`` mount)."""
    path = directory / "null"
    try:
        st = os.lstat(path)
        fine = stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    except FileNotFoundError:
        fine = False
    if not fine:
        staging = directory / ".null.new"
        staging.unlink(missing_ok=True)
        os.mknod(staging, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.chmod(staging, 0o666)  # noqa: S103 (a null device: anyone may read and write it)
        staging.rename(path)
    with open(path, "r+b"):  # fails on a nodev mount
        pass
    return path


def run_detached(
    argv: Sequence[str],
    log: Path,
    *,
    null: Path,
    timeout: float = 60.0,
    fd3: int | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run a command that leaves a process behind (``crun create``) with all its stdio on ``null`` (a
    ``private_null``): the process left behind inherits it (a pipe we waited on would never close; a host
    file would be writable from inside the sandbox). The command must write its own messages to ``log``
    (``--log``), read back when it fails. ``fd3``: a descriptor handed to the command as its fd 3 (nothing
    else is inherited). ``env``: variables added to this process's environment for the command."""
    full_env = {**os.environ, **(env or {})}
    if fd3 is not None:
        _spawn_with_fd3(argv, fd3, log, timeout, null, full_env)
        return
    try:
        with open(null, "r+b") as stdio:
            done = subprocess.run(
                list(argv),
                stdin=stdio,
                stdout=stdio,
                stderr=stdio,
                timeout=timeout,
                check=False,
                env=full_env,
            )
    except FileNotFoundError as exc:
        raise CommandFailed(argv, 127, f"{argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(argv, -9, f"timed out after {timeout} s") from exc
    if done.returncode != 0:
        raise _failed(argv, done.returncode, log)


def _failed(argv: Sequence[str], code: int, log: Path) -> CommandFailed:
    """The error of a detached command, with the end of the log it wrote its messages to."""
    try:
        message = log.read_text(errors="replace")[-4000:]
    except OSError:
        message = ""
    return CommandFailed(argv, code, message or "no message")


def _spawn_with_fd3(
    argv: Sequence[str], fd: int, log: Path, timeout: float, null: Path, env: Mapping[str, str]
) -> None:
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, str(null), os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(null), os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, str(null), os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, fd, 3),  # the duplicate is inheritable; Python's own descriptors are not
    ]
    try:
        pid = os.posix_spawnp(argv[0], list(argv), dict(env), file_actions=actions)
    except FileNotFoundError as exc:
        raise CommandFailed(argv, 127, f"{argv[0]} is not installed") from exc
    deadline = time.monotonic() + timeout
    while True:
        done_pid, status = os.waitpid(pid, os.WNOHANG)
        if done_pid:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise CommandFailed(argv, -9, f"timed out after {timeout} s")
        time.sleep(0.0005)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise _failed(argv, code, log)


def run(
    argv: Sequence[str],
    *,
    timeout: float = 60.0,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run ``argv`` (never through a shell), return its stdout; raise CommandFailed when it fails. ``env``:
    variables added to this process's environment for the command."""
    try:
        done = subprocess.run(
            list(argv),
            input=input_text,
            env=None if env is None else {**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandFailed(argv, 127, f"{argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(argv, -9, f"timed out after {timeout} s") from exc
    if done.returncode != 0:
        raise CommandFailed(argv, done.returncode, done.stderr)
    return done.stdout
