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
import shutil
from dataclasses import dataclass
from pathlib import Path

from corral.net.gateway import NetworkError
from corral.node.agent.client import AgentUnavailable, detach_agent
from corral.node.files import FileError
from corral.node.local import AGENT_SOCKET, INIT_PATH, LocalNode, NodeError, Resources, listening
from corral.runtime import freezer, rootfs
from corral.runtime.images import Image
from corral.runtime.proc import CommandFailed, run

log = logging.getLogger(__name__)

MEMORY_MARK = "inventory.img"  # CRIU writes it last: its presence means a complete dump


@dataclass(frozen=True)
class Capture:
    path: Path

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

    def capture(self, cid: str, key: str, *, memory: bool, disk: bool, leave_running: bool) -> Capture:
        """Capture the running sandbox ``cid`` as ``key``. Without ``leave_running`` (hibernate) the sandbox is
        gone afterwards (its disk volume stays). On failure the sandbox runs on and no capture is left."""
        node = self.node
        if node.pid(cid) is None:
            raise StateError("the sandbox is not running")
        cap = self.get(key)
        if cap.path.exists():
            raise StateError(f"a capture named {key} exists")
        self.root.mkdir(mode=0o711, exist_ok=True)
        cap.path.mkdir(mode=0o755)
        slot: int | None = None
        detached = frozen = False
        try:
            if memory:
                self._detach_agent(cid)
                detached = True
                if node.gateway is not None:
                    slot = node.gateway.detach(cid)
                self._ping_range(cid, on=False)
            # frozen by us, not by CRIU: the disk is taken at the instant of the memory, and a dump that
            # ends the sandbox (hibernate) returns at once (~150 ms instead of up to 2 s once a sandbox has
            # been dumped before, CRIU waiting for the tasks it killed)
            freezer.freeze(node.cgroup_parent, cid)
            frozen = True
            if disk:
                node.disks.snapshot(node.disks.path(cid), cap.disk, readonly=True)
            if memory:
                node.runtime.checkpoint(
                    cid, cap.memory, cap.path / "work", leave_running=leave_running or frozen
                )
            if frozen:
                freezer.thaw(node.cgroup_parent, cid)
                frozen = False
        except Exception as exc:
            if frozen:
                freezer.thaw(node.cgroup_parent, cid)
            if detached:
                self._revive(cid, slot)
            self._keep_log(cap.path / "work" / "dump.log", f"{cid}-dump.log")
            self.drop(key)
            log.warning("capturing %s failed: %s", cid, exc)
            raise StateError(f"capturing the sandbox failed: {_short(exc)}") from exc
        if memory and not leave_running:
            # hibernate: CRIU left the processes frozen (we froze them) or killed them; end the container
            self._end(cid)
        elif detached:
            self._revive(cid, slot)
        return cap

    def _ping_range(self, cid: str, *, on: bool) -> None:
        """The sandbox's ICMP echo sockets (``net.ipv4.ping_group_range``, set at boot by the runtime): off
        while it is dumped (CRIU reads the range in the host's ids and cannot write it back inside the
        sandbox's user namespace), on again afterwards, written from the host in the host's ids."""
        pid = self.node.pid(cid)
        if pid is None:
            return
        base, size = self.node.config.id_base, self.node.config.id_size
        value = f"{base} {base + size - 1}" if on else "1 0"
        run(
            [
                "nsenter",
                f"--target={pid}",
                "--net",
                "sh",
                "-c",
                f"echo {value} > /proc/sys/net/ipv4/ping_group_range",
            ]
        )

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

    def _revive(self, cid: str, slot: int | None) -> None:
        """After a dump that left the sandbox running (or one that failed): its network and command server."""
        pid = self.node.pid(cid)
        if pid is None:
            return
        if self.node.gateway is not None and cid not in self.node.gateway.links():
            self.node.gateway.attach(cid, pid, slot)
        self._ping_range(cid, on=True)
        self.serve_commands(cid)

    def _end(self, cid: str) -> None:
        node = self.node
        with contextlib.suppress(Exception):
            node.runtime.delete(cid)
        freezer.thaw(node.cgroup_parent, cid)  # a killed task that is frozen never exits
        node.stop(cid)

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
        if not (memory / MEMORY_MARK).is_file():
            raise StateError("the saved state holds no memory")
        made_volume = False
        try:
            if disk_from is not None:
                volume = node.disks.clone(disk_from, cid, res.disk_mib)
                made_volume = True
            else:
                volume = node.disks.path(cid)
                if not volume.is_dir():
                    raise StateError("the sandbox's disk is missing")
            bundle = node.bundles / cid
            bundle.mkdir(mode=0o711, exist_ok=True)
            target = bundle / "rootfs"
            init_binary, agent = node.init()
            rootfs.mount_overlay(image.lowers_top_first, volume, target, root_uid=node.root_uid())
            node.write_config(cid, image, res, hostname, init_binary, agent)
            pid = node.runtime.restore(cid, bundle, memory, bundle / "criu")
            self._keep_seccomp(cid)
            if node.gateway is not None:
                node.gateway.attach(cid, pid)
            self._ping_range(cid, on=True)
            if agent:
                self.serve_commands(cid)
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

    def rename(self, cid: str, hostname: str) -> None:
        """A restored copy's own name: its UTS hostname (CRIU restores the source's) and /etc/hostname."""
        node = self.node
        node.set_hostname(cid, hostname)
        files = node.files(cid)
        for path, text in (
            ("/etc/hostname", f"{hostname}\n"),
            ("/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost\n"),
        ):
            with contextlib.suppress(FileError):
                files.write(path, [text.encode()], mode=0o644, parents=True)

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
