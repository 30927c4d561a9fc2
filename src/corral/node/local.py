"""The node on this host: boots, stops and removes sandboxes, runs processes in them, and reports what
exists on the host (for reconciliation). Every step that creates something has its undo, and a failed boot
undoes what it made."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from corral.domain.capacity import NodeCapacity
from corral.net import plan as netplan
from corral.net.gateway import Gateway, NetworkError
from corral.net.plan import NetPlan
from corral.node import agent as agent_binary
from corral.node import executors, interactive
from corral.node.agent.client import run_via_agent, run_via_agent_async
from corral.node.execution import Event, run_streaming
from corral.node.fileclient import end_file_access
from corral.node.files import FileError, SandboxFiles
from corral.node.interactive import Pty, Session
from corral.runtime import cgroups, devnodes, rootfs
from corral.runtime import disk as diskpool
from corral.runtime.argv import RuntimeCli
from corral.runtime.disk import DiskPool
from corral.runtime.driver import OciRuntime, criu_tools
from corral.runtime.images import Image, ImageStore
from corral.runtime.proc import CommandFailed, private_null, run
from corral.runtime.seccomp import default_profile
from corral.runtime.spec import DEFAULT_PATH, IdRange, Limits, Runtime, SandboxSpec, build_config

log = logging.getLogger(__name__)

INIT_PATH = "/.corral/init"
DEVICES_DIR = "dev"  # in a bundle: the sandbox's /dev with its own device nodes (``devnodes``)
GIB = 1024**3


class NodeError(Exception):
    """A sandbox operation failed on the host; the message is safe to show to the sandbox's owner."""


@dataclass(frozen=True)
class NodeConfig:
    root: Path  # the node's state: runtime state, bundles, disk pool
    images_dir: Path
    runtime: Runtime = Runtime.CRUN
    id_base: int = 100000
    id_size: int = 65536
    disk_pool_bytes: int | None = None  # sparse; None: the filesystem's free space less the reserve
    disk_reserve_bytes: int | None = None  # left free on the host's filesystem; None: disk.host_reserve_bytes
    mem_limit_bytes: int | None = None  # every sandbox together; None: the host's memory less the reserve
    mem_reserve_bytes: int | None = None  # None: cgroups.memory_reserve_bytes
    disk_watch_s: float = 10.0  # how often the pool's parent limit follows the host's free space (0: never)
    # corral-init (built by `make install`) when present: it also runs commands (~1 ms); else catatonit,
    # and commands go through the runtime's exec (~9 ms)
    init_binary: str | None = None
    runtime_binary: str | None = None
    network: NetPlan | None = None  # None: sandboxes get a network namespace with only loopback
    trust_pem: Path | None = None  # a CA certificate every sandbox trusts (the egress proxy's)


@dataclass(frozen=True)
class Resources:
    vcpus: float
    mem_mib: int
    disk_mib: int
    pids: int = 4096


@dataclass(frozen=True)
class Inventory:
    """What exists on the host for this node, by container id."""

    containers: dict[str, str]  # id -> runtime status (running, stopped, created, ...)
    volumes: set[str]
    bundles: set[str]
    cgroups: set[str]
    mounts: set[str]
    links: set[str] = field(default_factory=set)


@dataclass
class LocalNode:
    config: NodeConfig
    images: ImageStore = field(init=False)
    runtime: OciRuntime = field(init=False)
    disks: DiskPool = field(init=False)
    node_id: str = field(init=False, default="")
    gateway: Gateway | None = field(init=False, default=None)
    # short host steps run beside others (a boot's network beside the runtime's create, a restore's command
    # server beside its network)
    helpers: ThreadPoolExecutor = field(
        init=False, default_factory=lambda: ThreadPoolExecutor(8, thread_name_prefix="node-helper")
    )
    _layout_lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    # what all sandboxes share (the parent cgroup's and qgroup's limits), known after ``prepare``
    capacity: NodeCapacity | None = field(init=False, default=None)
    _disk_reserve: int = field(init=False, default=0)
    _watching: threading.Event = field(init=False, default_factory=threading.Event)

    def __post_init__(self) -> None:
        c = self.config
        if c.network is not None:
            self.gateway = Gateway(c.network)
        self.images = ImageStore(c.images_dir, c.id_base)
        binary = c.runtime_binary or shutil.which(c.runtime.value) or f"/usr/bin/{c.runtime.value}"
        self.runtime = OciRuntime(RuntimeCli(binary, str(c.root / "state")), null=c.root / "null")
        self.disks = DiskPool(c.root / "disk.img", c.root / "disk", c.disk_pool_bytes or 0)

    # ---- set-up ---------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Make the host ready (idempotent): cgroup layout crun needs, the disk pool, directories, node id."""
        c = self.config
        c.root.mkdir(mode=0o711, parents=True, exist_ok=True)
        id_file = c.root / "node-id"
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(4))
        self.node_id = id_file.read_text().strip()
        try:
            private_null(c.root)
        except OSError as exc:
            raise NodeError(
                f"the node's directory {c.root} cannot hold a device node (nodev?): {exc}"
            ) from exc
        if c.runtime is Runtime.CRUN:
            self._mount_cgroup_layout()
            with contextlib.suppress(CommandFailed):  # without CRIU there is no sandbox state, the rest works
                self.runtime = dataclasses.replace(self.runtime, criu_env=criu_tools(c.root / "criu-bin"))
        (c.root / "state").mkdir(mode=0o700, exist_ok=True)
        self.bundles.mkdir(mode=0o711, exist_ok=True)
        self._prepare_capacity()
        self.images.clean_staging()
        if self.gateway is not None:
            try:
                self.gateway.ensure()
            except NetworkError as exc:
                raise NodeError(str(exc)) from exc

    def _prepare_capacity(self) -> None:
        """The disk pool (sized from the free space unless configured) under its parent qgroup, and the
        parent memory cgroup, both limited: no sandbox, nor all of them together, can fill the pool or the
        host's filesystem, or push the host out of memory. Measured once per start."""
        c = self.config
        fs = os.statvfs(c.root)
        free, fs_size = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
        reserve = c.disk_reserve_bytes
        if reserve is None:
            reserve = diskpool.host_reserve_bytes(fs_size)
        if self.disks.image.exists():
            size = self.disks.image.stat().st_size
        else:
            size = c.disk_pool_bytes or diskpool.auto_pool_bytes(free, reserve)
        self.disks = dataclasses.replace(self.disks, size_bytes=size)
        self.disks.ensure()
        disk_limit = diskpool.parent_limit_bytes(size, self.disks.allocated_bytes(), free, reserve)
        self.disks.ensure_parent(disk_limit)
        self._disk_reserve = reserve
        if c.disk_watch_s > 0:
            threading.Thread(target=self._watch_disk, name="corral-disk-watch", daemon=True).start()
        with open("/proc/meminfo") as f:
            total = cgroups.host_memory_bytes(f.read())
        mem_reserve = c.mem_reserve_bytes
        if mem_reserve is None:
            mem_reserve = cgroups.memory_reserve_bytes(total)
        mem_limit = c.mem_limit_bytes or max(256 << 20, total - mem_reserve)
        try:
            cgroups.limit_parent_memory(self.cgroup_parent, mem_limit)
        except OSError as exc:  # e.g. EBUSY: running sandboxes use more than a lowered limit
            actual = cgroups.parent_memory(self.cgroup_parent)[1]
            if actual is None:
                raise NodeError(f"the sandboxes' parent memory cgroup cannot be limited: {exc}") from exc
            log.warning(
                "the sandboxes' memory limit stays %d MiB (%d MiB asked): %s",
                actual >> 20,
                mem_limit >> 20,
                exc,
            )
            mem_limit = min(actual, total)
        self.capacity = NodeCapacity(
            vcpus=os.cpu_count() or 1, mem_mib=mem_limit >> 20, disk_mib=disk_limit >> 20
        )
        log.info(
            "node capacity: %d vCPUs, %d MiB of memory, %d MiB of disk (pool %d MiB)",
            self.capacity.vcpus,
            self.capacity.mem_mib,
            self.capacity.disk_mib,
            size >> 20,
        )

    def _watch_disk(self) -> None:
        """Keep the parent qgroup's limit within what the host's filesystem can still give the sparse file:
        something else filling that filesystem (the database, logs, another instance) lowers it, so the
        sandboxes meet EDQUOT before the loop device meets ENOSPC (which would force btrfs read-only); space
        freed raises it again, never above the pool's own bound."""
        while not self._watching.wait(self.config.disk_watch_s):
            try:
                if not self.disks.accounting_consistent():
                    log.warning("the disk pool's quota accounting is inconsistent: rescanning")
                    self.disks.rescan()
                self.refresh_disk_limit()
            except Exception:
                log.exception("following the host's free space failed")

    def refresh_disk_limit(self) -> int | None:
        """Set the parent limit from the host's free space now; returns it (None before ``prepare``)."""
        if self.disks.parent_limit is None or not os.path.ismount(self.disks.mountpoint):
            return None
        fs = os.statvfs(self.config.root)
        limit = diskpool.parent_limit_bytes(
            self.disks.size_bytes, self.disks.allocated_bytes(), fs.f_bavail * fs.f_frsize, self._disk_reserve
        )
        if limit != self.disks.parent_limit:
            log.info(
                "the sandboxes' disk limit is now %d MiB (was %d MiB)",
                limit >> 20,
                self.disks.parent_limit >> 20,
            )
            self.disks.set_parent_limit(limit)
        return limit

    def usage(self) -> dict[str, int | None]:
        """What the sandboxes use now: memory (parent cgroup), disk (parent qgroup) and the pool's file."""
        mem_used, mem_limit = cgroups.parent_memory(self.cgroup_parent)
        disk_used, disk_limit = self.disks.parent_usage()
        fs = os.statvfs(self.config.root)
        return {
            "mem_bytes": mem_used,
            "mem_limit_bytes": mem_limit,
            "disk_bytes": disk_used,
            "disk_limit_bytes": disk_limit,
            "pool_size_bytes": self.disks.size_bytes,
            "pool_allocated_bytes": self.disks.allocated_bytes(),
            "host_free_bytes": fs.f_bavail * fs.f_frsize,
        }

    def attach(self) -> None:
        """Learn the node id of an existing node without changing anything (for ``teardown``)."""
        id_file = self.config.root / "node-id"
        if id_file.exists():
            self.node_id = id_file.read_text().strip()

    @property
    def bundles(self) -> Path:
        return self.config.root / "bundles"

    @property
    def cgroup_parent(self) -> str:
        return f"corral-{self.node_id}"

    def root_uid(self) -> int:
        return self.config.id_base

    # ---- sandboxes ------------------------------------------------------------------------------------------

    def ensure_cgroup_layout(self) -> None:
        """crun's precondition on a hybrid host (no controller in the unified tree), checked before each boot
        and restore: one small read. A controller can come back to that tree while the node runs (a v1
        hierarchy unmounted under it, which the kernel lets go later); it is mounted again here."""
        if self.config.runtime is Runtime.CRUN and not cgroups.unified_is_empty():
            self._mount_cgroup_layout()

    def _mount_cgroup_layout(self) -> None:
        with self._layout_lock:
            try:
                mounted = cgroups.ensure_hybrid_layout()
            except (OSError, subprocess.SubprocessError) as exc:
                raise NodeError(f"the host's cgroup layout cannot be made ready for crun: {exc}") from exc
        if mounted:
            log.info(
                "mounted the cgroup v1 controller(s) %s (crun needs them out of the unified tree)", mounted
            )

    def boot(self, cid: str, image: Image, res: Resources, hostname: str, *, fresh: bool) -> int:
        """Boot sandbox ``cid`` from ``image``: on a new disk when ``fresh``, else on its existing disk.
        Returns the init's host PID. On failure nothing it made is left (a fresh disk is removed too)."""
        made_volume = False
        try:
            if fresh:
                volume = self.disks.create(cid, res.disk_mib)
                made_volume = True
                (volume / "upper").mkdir(mode=0o755, exist_ok=True)
                rootfs.seed_identity(volume, hostname, self.root_uid())
            else:
                volume = self.volume(cid)
            bundle, init_binary, agent = self.mount_root(cid, image, volume)
            target = bundle / "rootfs"
            # the network's files are written while the runtime creates the container, the link is made
            # while it starts it: neither depends on the other (together ~10 ms off a cold boot)
            seeding = self._beside(self._seed_network, cid, target) if self.gateway is not None else None
            self.write_config(cid, image, res, hostname, init_binary, agent)
            self.ensure_cgroup_layout()
            try:
                if not agent:
                    pid = self.runtime.create(cid, bundle)
                else:
                    with listening(bundle / AGENT_SOCKET) as listener:
                        pid = self.runtime.create(cid, bundle, fd3=listener.fileno())
            finally:
                if seeding is not None:
                    seeding.result()
            self._remember_seccomp(cid)
            if self.gateway is not None:
                attaching = self._beside(self.gateway.attach, cid, pid)
                try:
                    self.runtime.start(cid)
                finally:
                    attaching.result()
            else:
                self.runtime.start(cid)
            return pid
        except Exception as exc:
            self.stop(cid)
            if made_volume:
                self.disks.delete(cid)
            if isinstance(exc, NodeError | NetworkError):
                raise NodeError(str(exc)) from exc
            raise NodeError(f"the sandbox failed to boot: {exc}") from exc

    def volume(self, cid: str) -> Path:
        """The existing disk of sandbox ``cid``."""
        volume = self.disks.path(cid)
        if not volume.is_dir():
            raise NodeError("the sandbox's disk is missing")
        return volume

    def mount_root(self, cid: str, image: Image, volume: Path) -> tuple[Path, str, bool]:
        """The sandbox's bundle directory, with its root (the image's layers under ``volume``) mounted at
        ``rootfs`` and (crun) its own /dev with its own device nodes in ``dev``, for a boot and a restore
        alike; returns the bundle and ``init()``'s answer."""
        bundle = self.bundles / cid
        bundle.mkdir(mode=0o711, exist_ok=True)
        init_binary, agent = self.init()
        rootfs.mount_overlay(image.lowers_top_first, volume, bundle / "rootfs", root_uid=self.root_uid())
        if self.config.runtime is Runtime.CRUN:  # runc makes its own /dev (``spec``)
            devnodes.make_devices(bundle / DEVICES_DIR, self.root_uid())
        return bundle, init_binary, agent

    def write_config(
        self, cid: str, image: Image, res: Resources, hostname: str, init_binary: str, agent: bool
    ) -> None:
        """The sandbox's OCI config.json in its bundle (the same for a boot and a restore)."""
        bundle = self.bundles / cid
        spec = SandboxSpec(
            hostname=hostname,
            rootfs=str(bundle / "rootfs"),
            ids=IdRange(self.config.id_base, self.config.id_size),
            limits=Limits(vcpus=res.vcpus, mem_mib=res.mem_mib, pids=res.pids),
            cgroups_path=f"/{self.cgroup_parent}/{cid}",
            args=(INIT_PATH,) if agent else (INIT_PATH, "-P"),
            env=_env_map(image.env),
            runtime=self.config.runtime,
            seccomp=default_profile(),
            binds=((init_binary, INIT_PATH),),
            annotations={"run.corral.node": self.node_id},
            devices_dir=str(bundle / DEVICES_DIR),
        )
        (bundle / "config.json").write_text(json.dumps(build_config(spec)))

    def _seccomp_copy(self) -> Path:
        profile = json.dumps(default_profile(), sort_keys=True).encode()
        return self.config.root / f"seccomp-{hashlib.sha256(profile).hexdigest()[:16]}.bpf"

    def _remember_seccomp(self, cid: str) -> None:
        """Keep the filter crun compiled for a sandbox (the same for every sandbox of this profile): a
        restored sandbox needs it put back (see ``node.state``)."""
        if not self.runtime.cli.is_crun:
            return
        copy = self._seccomp_copy()
        compiled = Path(self.runtime.cli.state_root) / cid / "seccomp.bpf"
        if not copy.exists() and compiled.exists():
            staging = copy.with_suffix(".new")
            shutil.copyfile(compiled, staging)
            staging.chmod(0o600)
            staging.rename(copy)

    def seccomp_filter(self) -> Path | None:
        copy = self._seccomp_copy()
        return copy if copy.exists() else None

    def _beside(self, fn: Callable[..., object], *args: object) -> Future[object]:
        """Run ``fn`` in a helper thread while the caller goes on (``.result()`` joins and re-raises)."""
        return self.helpers.submit(fn, *args)

    def _seed_network(self, cid: str, target: Path) -> None:
        """The network's files in the sandbox's root: the gateway as resolver, the egress CA in the system
        trust store. Written through the mounted root with every path resolved inside it (a symlink the
        sandbox planted, say /etc/ssl -> /etc/ssl, cannot send a write to the host); a path the sandbox
        broke in its own root is skipped, and only it loses by that."""
        files = SandboxFiles.at(str(target), self.root_uid(), self.root_uid())
        wanted: dict[str, str] = {"/etc/resolv.conf": netplan.resolv_conf()}
        if self.config.trust_pem is not None:
            trust = self.config.trust_pem.read_text()
            try:
                bundle = files.read_small("/" + rootfs.SYSTEM_BUNDLE, 16 << 20).decode("utf-8", "replace")
            except FileError:
                bundle = ""
            wanted["/" + rootfs.SYSTEM_BUNDLE] = rootfs.with_trust(bundle, trust)
            wanted["/" + rootfs.LOCAL_CA] = trust
        for path, text in wanted.items():
            try:
                files.write(path, [text.encode()], mode=0o644, parents=True)
            except FileError as exc:
                log.warning("sandbox %s: %s not written: %s", cid, path, exc)

    def init(self) -> tuple[str, bool]:
        """The init binary for new sandboxes, and whether it is corral-init (which runs commands). It is
        bind-mounted from a copy on the disk pool, so a sandbox's mount table shows no host path."""
        source = self.config.init_binary
        if source is None:
            source = str(agent_binary.BINARY) if agent_binary.BINARY.exists() else "/usr/bin/catatonit"
        name = Path(source).name
        copy = self.disks.mountpoint / "init" / name
        if not copy.exists() or copy.stat().st_mtime < Path(source).stat().st_mtime:
            copy.parent.mkdir(mode=0o755, exist_ok=True)
            staging = copy.with_name(f".{name}.new")
            shutil.copy2(source, staging)
            staging.chmod(0o755)
            staging.rename(copy)
        return str(copy), name == "corral-init"

    def agent_socket(self, cid: str) -> Path | None:
        path = self.bundles / cid / AGENT_SOCKET
        return path if path.exists() else None

    def run(
        self,
        cid: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float = 60.0,
    ) -> Iterator[Event]:
        """Run a command in the sandbox: through its corral-init when it has one, else the runtime's exec."""
        full = {**self.base_env(), **(env or {})}
        sock = self.agent_socket(cid)
        if sock is not None:
            return run_via_agent(
                sock,
                args,
                env=full,
                cwd=cwd or "/",
                user=user,
                timeout=timeout,
                kill_session=lambda inner: self.kill_inner_session(cid, inner),
            )
        return run_streaming(self, cid, args, env=full, cwd=cwd, user=user, timeout=timeout)

    async def run_async(
        self,
        cid: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float = 60.0,  # noqa: ASYNC109  # the command's, not this call's
    ) -> AsyncIterator[Event]:
        """:meth:`run`, awaited: through corral-init over an asyncio connection (no thread waits while the
        command runs); without corral-init, the runtime's exec read on the bounded ``EXEC_RUNTIME`` pool.
        Closing the iterator before the end kills the command's session."""
        full = {**self.base_env(), **(env or {})}
        sock = await executors.run(executors.SESSIONS, self.agent_socket, cid)
        events: AsyncIterator[Event]
        if sock is not None:
            events = run_via_agent_async(
                sock,
                args,
                env=full,
                cwd=cwd or "/",
                user=user,
                timeout=timeout,
                kill_session=lambda inner: self.kill_inner_session(cid, inner),
                background=lambda kill, inner: executors.submit(executors.KILLS, kill, inner),
            )
        else:
            stop = threading.Event()
            blocking = run_streaming(
                self, cid, args, env=full, cwd=cwd, user=user, timeout=timeout, stop=stop
            )
            events = executors.iterate(executors.EXEC_RUNTIME, blocking, on_close=stop.set)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def open_session(
        self,
        cid: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        user: str | None = None,
        pty: Pty | None = None,
    ) -> Session:
        """An interactive command (SSH, terminal, shell): its stdin too, on a terminal when ``pty`` is given."""
        sock = self.agent_socket(cid)
        if sock is None:
            raise NodeError("the sandbox has no command server (not running, or booted with another init)")
        return await interactive.start(
            sock,
            self.files(cid),
            args,
            env={**self.base_env(), **env},
            cwd=cwd,
            user=user,
            pty=pty,
            kill_session=lambda inner: self.kill_inner_session(cid, inner),
        )

    def base_env(self) -> dict[str, str]:
        """What every command run in a sandbox starts from (the request's env is laid over it)."""
        env = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "xterm"}
        if self.gateway is not None and self.config.trust_pem is not None:
            env.update(rootfs.TRUST_ENV)
        return env

    def kill_inner_session(self, cid: str, inner_sid: int, *, deadline_s: float = 10.0) -> None:
        """SIGKILL, from the host, every process of the sandbox whose session id *inside* it is
        ``inner_sid``: the group first (atomic with respect to fork), then each member, until none is left."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            members = self.sandbox_pids(cid)
            victims = [p for p in members if _inner_ids(p, "NSsid") == inner_sid]
            if not victims:
                return
            # only groups led by a process of the sandbox (never a host group a process entered with)
            groups = {_outer_ids(p, "NSpgid") for p in victims} & members
            for group in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)  # type: ignore[arg-type]
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def stop(self, cid: str) -> None:
        """Kill every process, remove the container, its network link, mounts and cgroups; keep the disk. Its
        file workers and SFTP sessions end first, and again once the init is gone (one started meanwhile)."""
        end_file_access(cid)
        self.runtime.delete(cid)
        end_file_access(cid)
        if self.gateway is not None:
            self.gateway.release(cid)
        bundle = self.bundles / cid
        for point in rootfs.mounts_under(bundle):
            rootfs.unmount(point)
        cgroups.remove(self.cgroup_parent, cid)
        shutil.rmtree(bundle, ignore_errors=True)

    def destroy(self, cid: str) -> None:
        """Stop, then delete the disk: nothing of the sandbox is left on the host."""
        self.stop(cid)
        self.disks.delete(cid)

    def pid(self, cid: str) -> int | None:
        state = self.runtime.state(cid)
        if not state or state.get("status") != "running":
            return None
        pid = state.get("pid")
        return int(pid) if isinstance(pid, int) and pid > 0 else None

    def set_hostname(self, cid: str, hostname: str) -> None:
        pid = self.pid(cid)
        if pid is None:
            raise NodeError("the sandbox is not running")
        run(["nsenter", "--target", str(pid), "--uts", "hostname", hostname])

    def spawn_process(
        self,
        cid: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        pid_file: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        full = {**self.base_env(), **(env or {})}
        return self.runtime.exec_process(cid, args, env=full, cwd=cwd, user=user, pid_file=pid_file)

    def files(self, cid: str) -> SandboxFiles:
        pid = self.pid(cid)
        if pid is None:
            raise NodeError("the sandbox is not running")
        joined = tuple(str(d / cid) for d in cgroups.parent_dirs(self.cgroup_parent) if (d / cid).is_dir())
        return SandboxFiles(pid, self.config.id_base, self.config.id_base, cid=cid, cgroups=joined)

    def sandbox_pids(self, cid: str) -> set[int]:
        return cgroups.procs(self.cgroup_parent, cid)

    # ---- inventory and clean-up -----------------------------------------------------------------------------

    def release(self) -> None:
        """At shutdown: remove the node's cgroup parent if no sandbox is left under it."""
        self._watching.set()
        if self.node_id:
            cgroups.prune(self.cgroup_parent)

    def inventory(self) -> Inventory:
        containers: dict[str, str] = {}
        for cid in self.runtime.names():
            state = self.runtime.state(cid)
            containers[cid] = str(state.get("status")) if state else "unknown"
        bundles = {p.name for p in self.bundles.iterdir()} if self.bundles.is_dir() else set()
        mounts = {p.parent.name for p in rootfs.mounts_under(self.bundles)}
        return Inventory(
            containers=containers,
            volumes=self.disks.names(),
            bundles=bundles,
            cgroups=cgroups.children(self.cgroup_parent),
            mounts=mounts,
            links=set(self.gateway.links()) if self.gateway is not None else set(),
        )

    def reclaim_links(self, keep: set[str]) -> None:
        """Remove the network links whose container is not in ``keep`` (a stop leaves the link to go with
        its namespace; a link whose namespace is gone too but that is still there is a leftover)."""
        if self.gateway is not None:
            self.gateway.reclaim(keep)

    def ids_on_host(self) -> set[str]:
        inv = self.inventory()
        return set(inv.containers) | inv.volumes | inv.bundles | inv.cgroups | inv.mounts | inv.links

    def teardown(self) -> list[str]:
        """Remove every sandbox of this node and unmount the disk pool (``corral node reset``; tests).
        Touches nothing of another node (its own state dir, cgroup parent, pool and gateway only). Returns
        what stays on the host (see ``DiskPool.unmount``)."""
        if self.config.root.exists():
            for cid in self.runtime.names():
                self.runtime.delete(cid)
            if self.bundles.is_dir():
                for point in rootfs.mounts_under(self.bundles):
                    rootfs.unmount(point)
                for bundle in self.bundles.iterdir():
                    shutil.rmtree(bundle, ignore_errors=True)
        if self.node_id:
            cgroups.remove(self.cgroup_parent)
        left = self.disks.unmount()
        if self.gateway is not None:
            self.gateway.teardown()
        return left


AGENT_SOCKET = "agent.sock"


def _status_ids(pid: int, key: str) -> list[int]:
    """The ids of ``key`` (NSsid, NSpgid, NSpid) of a process, outermost namespace first."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def _inner_ids(pid: int, key: str) -> int | None:
    ids = _status_ids(pid, key)
    return ids[-1] if ids else None


def _outer_ids(pid: int, key: str) -> int | None:
    ids = _status_ids(pid, key)
    return ids[0] if ids else None


@contextlib.contextmanager
def listening(path: Path) -> Iterator[socket.socket]:
    """A listening unix socket at ``path`` (owner-only), closed here once handed to the sandbox's init."""
    if len(str(path)) > 100:
        raise NodeError(f"the data directory's path is too long for a unix socket: {path}")
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(128)
        yield listener
    finally:
        listener.close()


def _env_map(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if sep and key:
            env[key] = value
    return env
