"""The one thin function that runs a host command, and the error it raises. Everything else builds argv as data."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
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


def run_detached(argv: Sequence[str], log: Path, *, timeout: float = 60.0, fd3: int | None = None) -> None:
    """Run a command that leaves a process behind (``crun create``) with all its stdio on /dev/null: the
    process left behind inherits it (a pipe we waited on would never close; a host file would be writable
    from inside the sandbox). The command must write its own messages to ``log`` (``--log``), read back when
    it fails. ``fd3``: a descriptor handed to the command as its fd 3 (nothing else is inherited)."""
    if fd3 is not None:
        _spawn_with_fd3(argv, fd3, log, timeout)
        return
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
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


def _spawn_with_fd3(argv: Sequence[str], fd: int, log: Path, timeout: float) -> None:
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, fd, 3),  # the duplicate is inheritable; Python's own descriptors are not
    ]
    try:
        pid = os.posix_spawnp(argv[0], list(argv), dict(os.environ), file_actions=actions)
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


def run(argv: Sequence[str], *, timeout: float = 60.0, input_text: str | None = None) -> str:
    """Run ``argv`` (never through a shell), return its stdout; raise CommandFailed when it fails."""
    try:
        done = subprocess.run(
            list(argv),
            input=input_text,
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
