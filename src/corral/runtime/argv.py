"""Command lines of the OCI runtime CLI (crun or runc), built as data. The driver runs them; tests read them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeCli:
    binary: str  # path of crun or runc
    state_root: str  # --root: where the runtime keeps its container state

    def _base(self) -> list[str]:
        return [self.binary, "--root", self.state_root]

    def create(
        self, name: str, bundle: str, pid_file: str, log: str | None = None, preserve_fds: int = 0
    ) -> list[str]:
        """``log``: the runtime's own messages go there (a global option), so the container's stdio can be
        /dev/null: whatever the runtime create inherits, the sandbox's init keeps."""
        base = [*self._base(), *(["--log", log] if log else [])]
        extra = ["--preserve-fds", str(preserve_fds)] if preserve_fds else []
        return [*base, "create", "--bundle", bundle, "--pid-file", pid_file, *extra, name]

    def start(self, name: str) -> list[str]:
        return [*self._base(), "start", name]

    def state(self, name: str) -> list[str]:
        return [*self._base(), "state", name]

    def kill(self, name: str, signal: str = "KILL") -> list[str]:
        return [*self._base(), "kill", "--all", name, signal]

    def delete(self, name: str, *, force: bool = True) -> list[str]:
        return [*self._base(), "delete", *(["--force"] if force else []), name]

    @property
    def is_crun(self) -> bool:
        return "crun" in self.binary.rsplit("/", 1)[-1]

    def checkpoint(self, name: str, image_dir: str, work_dir: str, *, leave_running: bool) -> list[str]:
        """Dump the container's processes with CRIU into ``image_dir``. The sandbox's network link is removed
        before (no TCP connection is kept), so CRIU's network lock is skipped where the runtime offers it
        (crun; ~65-100 ms of iptables otherwise)."""
        cmd = [*self._base(), "checkpoint", "--image-path", image_dir, "--work-path", work_dir]
        if leave_running:
            cmd.append("--leave-running")
        if self.is_crun:
            cmd += ["--network-lock", "skip"]
        return [*cmd, name]

    def restore(self, name: str, bundle: str, image_dir: str, work_dir: str, pid_file: str) -> list[str]:
        """Restore a container from ``image_dir`` with the configuration in ``bundle`` (a new name is a
        new container: a fork), detached, its init's host PID written to ``pid_file``."""
        cmd = [
            *self._base(),
            "restore",
            "--bundle",
            bundle,
            "--image-path",
            image_dir,
            "--work-path",
            work_dir,
        ]
        cmd += ["--detach", "--pid-file", pid_file]
        if self.is_crun:
            cmd += ["--network-lock", "skip"]
        return [*cmd, name]

    def exec_detached(self, name: str, args: Sequence[str], *, preserve_fds: int = 0) -> list[str]:
        """``exec`` of a process left running in the sandbox (its fds 3.. from ``preserve_fds``)."""
        extra = ["--preserve-fds", str(preserve_fds)] if preserve_fds else []
        return [*self._base(), "exec", "--detach", "--no-new-privs", *extra, name, *args]

    def list_names(self) -> list[str]:
        return [*self._base(), "list", "--quiet"]

    def exec(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: bool = False,
        pid_file: str | None = None,
    ) -> list[str]:
        """``exec`` of a process in a running sandbox. Environment values travel in argv: callers must never
        put a secret's real value here (sandboxes only ever hold placeholders).

        ``--no-new-privs`` always: an exec'd process does not inherit ``noNewPrivileges`` from config.json
        (measured with crun 1.8.1: ``NoNewPrivs: 0`` without the flag)."""
        cmd = [*self._base(), "exec", "--no-new-privs"]
        for key, value in (env or {}).items():
            cmd += ["--env", f"{key}={value}"]
        if cwd is not None:
            cmd += ["--cwd", cwd]
        if user is not None:
            cmd += ["--user", user]
        if tty:
            cmd.append("--tty")
        if pid_file is not None:
            cmd += ["--pid-file", pid_file]
        return [*cmd, name, *args]
