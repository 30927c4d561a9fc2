"""The OCI runtime driver: crun (default) or runc, run through its CLI. Argv comes from ``argv.RuntimeCli``
(pure); this module only runs it and reads the answers."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.runtime.argv import RuntimeCli
from corral.runtime.proc import CommandFailed, run, run_detached


@dataclass(frozen=True)
class OciRuntime:
    cli: RuntimeCli

    @property
    def name(self) -> str:
        return Path(self.cli.binary).name

    def create(self, cid: str, bundle: Path, *, fd3: int | None = None) -> int:
        """Create the container (its init waits for ``start``); return the init's host PID. ``fd3`` is
        handed to the init as its fd 3."""
        pid_file = bundle / "init.pid"
        log = bundle / "runtime.log"
        argv = self.cli.create(
            cid, str(bundle), str(pid_file), str(log), preserve_fds=1 if fd3 is not None else 0
        )
        run_detached(argv, log, timeout=60, fd3=fd3)
        return int(pid_file.read_text().strip())

    def start(self, cid: str) -> None:
        run(self.cli.start(cid), timeout=30)

    def kill(self, cid: str, signal: str = "KILL") -> None:
        run(self.cli.kill(cid, signal), timeout=30)

    def delete(self, cid: str) -> None:
        """Force-delete (kills what runs). A container that is already gone is fine."""
        try:
            run(self.cli.delete(cid, force=True), timeout=60)
        except CommandFailed as exc:
            if self.state(cid) is not None:
                raise exc

    def state(self, cid: str) -> dict[str, Any] | None:
        try:
            out = run(self.cli.state(cid), timeout=30)
        except CommandFailed:
            return None
        data = json.loads(out)
        return data if isinstance(data, dict) else None

    def names(self) -> set[str]:
        try:
            out = run(self.cli.list_names(), timeout=30)
        except CommandFailed:
            return set()
        return {line.strip() for line in out.splitlines() if line.strip()}

    def exec_process(
        self,
        cid: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: int | None = subprocess.DEVNULL,
        pid_file: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a process in the running container; its stdout/stderr are pipes the caller reads. The
        process's host PID is written to ``pid_file`` (it leads its own session: its whole tree shares it)."""
        argv = self.cli.exec(
            cid, args, env=env, cwd=cwd, user=user, pid_file=str(pid_file) if pid_file else None
        )
        return subprocess.Popen(
            argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
