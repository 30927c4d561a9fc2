"""The OCI runtime driver: crun (default) or runc, run through its CLI. Argv comes from ``argv.RuntimeCli``
(pure); this module only runs it and reads the answers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.runtime.argv import RuntimeCli
from corral.runtime.proc import CommandFailed, run, run_detached

COLLECT_TIMEOUT_S = 2


def unseizable(exc: CommandFailed) -> bool:
    """A dump that failed because a process could not be stopped at that instant (a parent waiting in vfork
    for a child the freeze caught before its exec): worth trying again."""
    return "Unseizable" in exc.stderr or "Timeout reached" in exc.stderr


CRIU_TOOLS = ("criu", "ip", "sh", "tar", "gzip")


def criu_tools(directory: Path) -> dict[str, str]:
    """A directory of links to the only programs CRIU needs to run for a sandbox (itself, ``ip`` to save and
    restore the network namespace's addresses, routes and rules, ``sh`` for action scripts, ``tar`` and
    ``gzip`` for the contents of tmpfs mounts), and the PATH that names it alone. Without it CRIU also runs
    ``iptables-save``/``-legacy-save`` and ``ip6tables``' twice each to look for legacy iptables rules (about
    25 ms of every dump and restore); a sandbox cannot have such rules (it holds no CAP_NET_ADMIN), and its
    nftables ruleset, if any, CRIU dumps through libnftables."""
    directory.mkdir(mode=0o755, exist_ok=True)
    for name in CRIU_TOOLS:
        found = shutil.which(name)
        link = directory / name
        if found is None:
            raise CommandFailed([name], 127, f"{name} is not installed")
        if not link.is_symlink() or os.readlink(link) != found:
            link.unlink(missing_ok=True)
            link.symlink_to(found)
    return {"PATH": str(directory)}


@dataclass(frozen=True)
class OciRuntime:
    cli: RuntimeCli
    null: Path  # the stdio of runtime commands that start processes in a sandbox (``proc.private_null``)
    # the environment of checkpoint and restore (``criu_tools``'s PATH, with crun; runc takes its network lock
    # with iptables and keeps the host's PATH)
    criu_env: Mapping[str, str] | None = None

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
        run_detached(argv, log, null=self.null, timeout=60, fd3=fd3)
        return int(pid_file.read_text().strip())

    def checkpoint(
        self, cid: str, image_dir: Path, work_dir: Path, *, leave_running: bool, post_dump: Path | None = None
    ) -> None:
        """CRIU-dump the container into ``image_dir`` (mode 755: the restored init, root of the sandbox's
        user namespace, must read it); CRIU's own log is ``work_dir/dump.log``. ``post_dump``: a script CRIU
        runs once the memory is dumped, while every process is still stopped (given to CRIU through a
        configuration file in ``work_dir``, which both runtimes let CRIU read from its environment)."""
        for d in (image_dir, work_dir):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
            d.chmod(0o755)
        # CRIU's own settings, through a configuration file it reads from its environment (both runtimes pass
        # it on): a short timeout to collect the processes (a process caught in vfork cannot be seized: the
        # caller tries again at once rather than after CRIU's default 10 s)
        config = work_dir / "criu.conf"
        config.write_text(
            f"timeout {COLLECT_TIMEOUT_S}\n"
            + (f"action-script {post_dump}\n" if post_dump is not None else "")
        )
        env = {**(self.criu_env or {}), "CRIU_CONFIG_FILE": str(config)}
        try:
            run(
                self.cli.checkpoint(cid, str(image_dir), str(work_dir), leave_running=leave_running),
                timeout=300,
                env=env,
            )
        except CommandFailed as exc:
            raise CommandFailed(exc.argv, exc.returncode, exc.stderr + _tail(work_dir / "dump.log")) from None

    def restore(self, cid: str, bundle: Path, image_dir: Path, work_dir: Path) -> int:
        """Restore a container named ``cid`` from ``image_dir`` with ``bundle``'s config; its init's host PID."""
        pid_file = bundle / "init.pid"
        pid_file.unlink(missing_ok=True)
        work_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        log = bundle / "runtime.log"
        argv = self.cli.restore(cid, str(bundle), str(image_dir), str(work_dir), str(pid_file))
        argv = [argv[0], "--log", str(log), *argv[1:]]
        try:
            run_detached(argv, log, null=self.null, timeout=300, env=self.criu_env)
        except CommandFailed as exc:
            raise CommandFailed(
                exc.argv, exc.returncode, exc.stderr + _tail(work_dir / "restore.log")
            ) from None
        return int(pid_file.read_text().strip())

    def exec_detached(self, cid: str, args: Sequence[str], log: Path, *, fd3: int | None = None) -> None:
        """Start a process left running in the container (``fd3``: handed to it as its fd 3)."""
        argv = self.cli.exec_detached(cid, args, preserve_fds=1 if fd3 is not None else 0)
        run_detached([argv[0], "--log", str(log), *argv[1:]], log, null=self.null, timeout=60, fd3=fd3)

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
        stdin: int | None = None,
        pid_file: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a process in the running container; its stdout/stderr are pipes the caller reads. The
        process's host PID is written to ``pid_file`` (it leads its own session: its whole tree shares it)."""
        argv = self.cli.exec(
            cid, args, env=env, cwd=cwd, user=user, pid_file=str(pid_file) if pid_file else None
        )
        with open(self.null, "rb") as null:  # never the host's /dev/null: the runtime chowns its stdio
            return subprocess.Popen(
                argv,
                stdin=null if stdin is None else stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )


def _tail(log: Path, lines: int = 10) -> str:
    """CRIU's errors and the end of its log, for the operator (never shown to API users)."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in text if "Error (" in line or "Warn" in line][:20]
    return "\n" + "\n".join([*errors, "...", *text[-lines:]])
