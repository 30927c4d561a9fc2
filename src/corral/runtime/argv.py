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
