"""A sandbox's state on this node: captured (disk, memory or both, at one instant) and restored, into the same
sandbox (resume, rollback) or a new one (fork, a VM from a snapshot).

A capture lives on the disk pool under ``states/<key>``: ``disk`` is a read-only btrfs snapshot of the sandbox's
volume (O(1); clones of it share every unchanged block), ``memory`` holds CRIU's images of its processes.

Around CRIU (see docs/architecture.md, "Sandbox state"):
- the command server lets go of the host first (its socket is bound outside the sandbox, which CRIU cannot
  dump), and a new one is started through the runtime's exec afterwards;
- the network link is removed before the dump and made again afterwards (CRIU cannot restore a veth whose
  peer is in another namespace; open TCP connections are lost);
- with the disk too, the sandbox is frozen while its disk is snapshotted and its memory dumped;
- crun does not keep the compiled seccomp filter of a restored container, and would then exec processes
  without it: the node puts it back;
- whatever fails, the sandbox that was captured keeps running, and a failed restore leaves nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.net.gateway import NetworkError
from corral.node.agent.client import AgentUnavailable, detach_agent
from corral.node.fileclient import end_file_access, sync_session, write_file
from corral.node.files import FileError, SandboxFiles
from corral.node.local import AGENT_SOCKET, INIT_PATH, LocalNode, NodeError, Resources, listening
from corral.runtime import freezer
from corral.runtime.driver import unseizable
from corral.runtime.images import Image
from corral.runtime.proc import CommandFailed

log = logging.getLogger(__name__)

MEMORY_MARK = "inventory.img"  # CRIU writes it last: its presence means a complete dump


@dataclass
class Capture:
    path: Path
    # of a capture just taken: the sandbox, its init's PID and network slot (to give the same one back)
    cid: str = ""
    pid: int | None = None
    slot: int | None = None

    @property
    def disk(self) -> Path:
        return self.path / "disk"

    @property
    def memory(self) -> Path:
        return self.path / "memory"

    @property
    def has_disk(self) -> bool:
        return (self.disk / "upper").is_dir()

    @property
    def has_memory(self) -> bool:
        return (self.memory / MEMORY_MARK).is_file()

    @property
    def key(self) -> str:
        return self.path.name


class Steps:
    """How long each step of an operation took, for the debug log."""

    def __init__(self) -> None:
        self.took: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.took[name] = (time.perf_counter() - start) * 1000

    def __str__(self) -> str:
        return " ".join(f"{k} {v:.1f} ms" for k, v in self.took.items())


def in_namespace(pid: int, kind: str, fn: Callable[[], None]) -> None:
    """Run ``fn`` in a thread that has entered namespace ``kind`` (``net``, ``uts``) of process ``pid``: what a
    ``nsenter`` would do, without starting a process. The thread ends right after."""
    flags = {"net": os.CLONE_NEWNET, "uts": os.CLONE_NEWUTS}
    failure: list[BaseException] = []

    def enter_and_run() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.setns(fd, flags[kind])
            finally:
                os.close(fd)
            fn()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=enter_and_run, name=f"corral-{kind}ns")
    thread.start()
    thread.join()
    if failure:
        raise StateError(f"in the sandbox's {kind} namespace: {failure[0]}") from failure[0]


def ping_group_range(pid: int, ids: tuple[int, int] | None) -> None:
    """The sandbox's ICMP echo sockets (``net.ipv4.ping_group_range`` of its network namespace, set at boot by
    the runtime): off (``ids`` None) while it is dumped, since CRIU reads the range in the host's ids and
    cannot write it back inside the sandbox's user namespace; on again afterwards for the sandbox's id
    range, written in the host's ids."""
    value = "1 0" if ids is None else f"{ids[0]} {ids[0] + ids[1] - 1}"

    def write() -> None:
        with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
            f.write(value)

    in_namespace(pid, "net", write)


def hibernate_key(cid: str) -> str:
    return f"hib-{cid}"


class StateError(NodeError):
    """Capturing or restoring a sandbox failed; the message is safe to show to its owner."""


class NodeState:
    def __init__(self, node: LocalNode) -> None:
        self.node = node

    @property
    def root(self) -> Path:
        return self.node.disks.mountpoint / "states"

    def get(self, key: str) -> Capture:
        self.node.disks.path(key)  # validates the name
        return Capture(self.root / key)

    def keys(self) -> set[str]:
        return {p.name for p in self.root.iterdir()} if self.root.is_dir() else set()

    def drop(self, key: str) -> None:
        """Remove a capture (its disk snapshot and memory images); missing is fine."""
        cap = self.get(key)
        if not cap.path.exists():
            return
        if cap.disk.exists():
            self.node.disks.delete_subvolume(cap.disk)
        shutil.rmtree(cap.path, ignore_errors=True)

    def size_bytes(self, key: str) -> int:
        """Bytes the capture's memory images take (its disk shares its blocks with the sandbox)."""
        cap = self.get(key)
        return (
            sum(p.stat().st_size for p in cap.memory.rglob("*") if p.is_file()) if cap.memory.is_dir() else 0
        )

    # ---- capture --------------------------------------------------------------------------------------------

    def capture(
        self, cid: str, key: str, *, memory: bool, disk: bool, leave_running: bool, revive: bool = True
    ) -> Capture:
        """Capture the running sandbox ``cid`` as ``key``. Without ``leave_running`` (hibernate) the sandbox is
        gone afterwards (its disk volume stays). With it, the sandbox gets its network and command server
        back before this returns, unless ``revive`` is False: then the caller calls ``revive(capture)`` (a
        fork does it while its children are restored). On failure the sandbox runs on and no capture is left."""
        node = self.node
        steps = Steps()
        pid = node.pid(cid)
        if pid is None:
            raise StateError("the sandbox is not running")
        cap = self.get(key)
        if cap.path.exists():
            raise StateError(f"a capture named {key} exists")
        self.root.mkdir(mode=0o711, exist_ok=True)
        cap.path.mkdir(mode=0o755)
        cap = Capture(cap.path, cid=cid, pid=pid)
        detached = frozen = False
        if not leave_running:
            end_file_access(cid)  # a hibernate: no file worker writes past the captured disk
        try:
            if memory:
                with steps("detach"):
                    unlinking = node.helpers.submit(self._detach_link, cap)
                    self._detach_agent(cid)
                    detached = True
                    ping_group_range(pid, None)
                    unlinking.result()
            if memory:
                # CRIU stops every process, dumps them, takes the disk (the post-dump script, while they are
                # still stopped: disk and memory of one instant) and leaves them running; a hibernate ends
                # the container itself afterwards (letting CRIU kill the processes took up to 2 s once a
                # sandbox had been dumped before: it waits for the tasks it killed)
                script = self._post_dump(cid, cap, disk=disk, freeze=not leave_running)
                with steps("dump"):
                    self._dump(cid, cap, script)
                if disk and not cap.has_disk:
                    raise StateError("the disk was not captured")
            elif disk:
                with steps("disk"):
                    freezer.freeze(node.cgroup_parent, cid)
                    frozen = True
                    node.disks.snapshot(node.disks.path(cid), cap.disk, readonly=True)
                    freezer.thaw(node.cgroup_parent, cid)
                    frozen = False
        except Exception as exc:
            if frozen:
                freezer.thaw(node.cgroup_parent, cid)
            if detached:
                self.revive(cap)
            self._keep_log(cap.path / "work" / "dump.log", f"{cid}-dump.log")
            self.drop(key)
            log.warning("capturing %s failed: %s", cid, exc)
            raise StateError(f"capturing the sandbox failed: {_short(exc)}") from exc
        if memory and not leave_running:
            with steps("end"):
                self._end(cid)
        elif detached and revive:
            with steps("revive"):
                self.revive(cap)
        log.debug("captured %s as %s: %s", cid, key, steps)
        return cap

    def _dump(self, cid: str, cap: Capture, script: Path | None, attempts: int = 4) -> None:
        for attempt in range(1, attempts + 1):
            try:
                self.node.runtime.checkpoint(
                    cid, cap.memory, cap.path / "work", leave_running=True, post_dump=script
                )
                return
            except CommandFailed as exc:
                if attempt == attempts or not unseizable(exc):
                    raise
                log.info(
                    "dumping %s: a process could not be stopped (attempt %d); trying again", cid, attempt
                )
                if cap.disk.exists():
                    self.node.disks.delete_subvolume(cap.disk)
                shutil.rmtree(cap.memory, ignore_errors=True)
                time.sleep(0.02 * attempt)

    def _post_dump(self, cid: str, cap: Capture, *, disk: bool, freeze: bool) -> Path | None:
        """The script CRIU runs once the memory is dumped, while every process is still stopped: it takes the
        disk (a read-only snapshot of the volume into the capture) and, for a hibernate, freezes the sandbox
        so nothing it does after the dump reaches its disk before it is ended."""
        lines = []
        if disk:
            btrfs = shutil.which("btrfs") or "btrfs"  # CRIU runs the script with its own short PATH
            argv = self.node.disks.snapshot_argv(
                self.node.disks.path(cid), cap.disk, readonly=True, btrfs=btrfs
            )
            lines.append(shlex.join(argv) + " >/dev/null")  # into the parent qgroup, as every snapshot
        if freeze:
            state, value = freezer.freeze_request(self.node.cgroup_parent, cid)
            lines.append(f"echo {value} > '{state}'")
        if not lines:
            return None
        script = cap.path / "post-dump"
        script.write_text(
            "#!/bin/sh\nset -e\n"
            '[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0\n' + "\n".join(lines) + "\n"
        )
        script.chmod(0o700)
        return script

    def _detach_link(self, cap: Capture) -> None:
        if self.node.gateway is not None:
            cap.slot = self.node.gateway.detach(cap.cid)

    def revive(self, cap: Capture) -> None:
        """After a dump that left the sandbox running (or one that failed): its network and command server."""
        node = self.node
        if cap.pid is None or node.gateway is None:
            self.serve_commands(cap.cid)
            return
        pid, gateway = cap.pid, node.gateway
        serving = node.helpers.submit(self.serve_commands, cap.cid)
        try:
            if cap.cid not in gateway.links():
                gateway.attach(cap.cid, pid, cap.slot)
            ping_group_range(pid, (node.config.id_base, node.config.id_size))
        finally:
            serving.result()

    def _end(self, cid: str) -> None:
        """The container of a hibernated sandbox (its processes dumped, then frozen): gone, its disk kept.
        Killed while frozen, then thawed: they die without running again."""
        with contextlib.suppress(CommandFailed):
            self.node.runtime.kill(cid, "KILL")
        freezer.thaw(self.node.cgroup_parent, cid)
        self.node.stop(cid)

    def _keep_log(self, log_file: Path, name: str) -> None:
        """CRIU's log of a failed dump or restore, kept for the operator in <node>/logs."""
        logs = self.node.config.root / "logs"
        with contextlib.suppress(OSError):
            logs.mkdir(mode=0o700, exist_ok=True)
            shutil.copyfile(log_file, logs / name)

    def _detach_agent(self, cid: str) -> None:
        sock = self.node.agent_socket(cid)
        if sock is None:
            return
        try:
            detach_agent(sock)
        except AgentUnavailable as exc:
            raise StateError(str(exc)) from exc
        sock.unlink(missing_ok=True)

    # ---- restore --------------------------------------------------------------------------------------------

    def restore(
        self,
        cid: str,
        memory: Path,
        image: Image,
        res: Resources,
        hostname: str,
        *,
        disk_from: Path | None = None,
    ) -> int:
        """Run sandbox ``cid`` again from the CRIU images in ``memory``: on a clone of a captured disk
        (``disk_from``: fork, rollback) or on its own volume (resume, a VM from a snapshot whose disk was
        unpacked into it). Returns the init's host PID. On failure nothing of ``cid`` is left running (a
        volume cloned here is removed too)."""
        node = self.node
        steps = Steps()
        if not (memory / MEMORY_MARK).is_file():
            raise StateError("the saved state holds no memory")
        made_volume = False
        try:
            if disk_from is not None:
                with steps("disk"):
                    volume = node.disks.clone(disk_from, cid, res.disk_mib)
                made_volume = True
            else:
                volume = node.volume(cid)
            bundle, init_binary, agent = node.mount_root(cid, image, volume)
            node.write_config(cid, image, res, hostname, init_binary, agent)
            node.ensure_cgroup_layout()
            with steps("restore"):
                pid = node.runtime.restore(cid, bundle, memory, bundle / "criu")
                self._keep_seccomp(cid)
            with steps("revive"):
                serving = node.helpers.submit(self.serve_commands, cid) if agent else None
                try:
                    if node.gateway is not None:
                        node.gateway.attach(cid, pid)
                        ping_group_range(pid, (node.config.id_base, node.config.id_size))
                finally:
                    if serving is not None:
                        serving.result()
            log.debug("restored %s: %s", cid, steps)
            return pid
        except Exception as exc:
            self._keep_log(node.bundles / cid / "criu" / "restore.log", f"{cid}-restore.log")
            node.stop(cid)
            if made_volume:
                node.disks.delete(cid)
            log.warning("restoring %s failed: %s", cid, exc)
            if isinstance(exc, StateError):
                raise
            raise StateError(f"restoring the sandbox failed: {_short(exc)}") from exc

    def rename(self, cid: str, pid: int, hostname: str) -> None:
        """A restored copy's own name: its UTS hostname (CRIU restores the source's) and /etc/hostname."""
        in_namespace(pid, "uts", lambda: socket.sethostname(hostname))
        files = SandboxFiles(pid, self.node.config.id_base, self.node.config.id_base)
        with contextlib.suppress(FileError, OSError), sync_session(files) as session:  # as the sandbox's root
            for path, text in (
                ("/etc/hostname", f"{hostname}\n"),
                (
                    "/etc/hosts",
                    f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost\n",
                ),
            ):
                with contextlib.suppress(FileError, OSError):
                    write_file(session, path, text.encode(), mode=0o644, parents=True)

    def serve_commands(self, cid: str) -> None:
        """Start the sandbox's command server (corral-init --serve) through the runtime's exec, with a new
        listening socket bound outside the sandbox's root, and wait until it answers."""
        node = self.node
        bundle = node.bundles / cid
        with listening(bundle / AGENT_SOCKET) as listener:
            node.runtime.exec_detached(
                cid, [INIT_PATH, "--serve"], bundle / "runtime.log", fd3=listener.fileno()
            )

    def _keep_seccomp(self, cid: str) -> None:
        """crun 1.21 restores a container without the compiled seccomp filter in its state directory, and then
        execs processes WITHOUT seccomp: put back the filter compiled for a container of the same config."""
        node = self.node
        if not node.runtime.cli.is_crun:
            return
        state = Path(node.runtime.cli.state_root) / cid
        target = state / "seccomp.bpf"
        if target.exists():
            return
        source = node.seccomp_filter()
        if source is None:
            raise StateError("no compiled seccomp filter to give the restored sandbox")
        shutil.copyfile(source, target)
        target.chmod(0o600)


def _short(exc: BaseException) -> str:
    if isinstance(exc, CommandFailed):
        return f"{exc.argv[0].rsplit('/', 1)[-1]} {exc.argv[1] if len(exc.argv) > 1 else ''} failed"
    if isinstance(exc, NodeError | NetworkError | freezer.FreezeError | FileError):
        return str(exc)
    return type(exc).__name__
