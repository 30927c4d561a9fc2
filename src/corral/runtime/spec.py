"""The OCI runtime ``config.json`` of a sandbox, built as data by pure functions (tested as data).

Every sandbox gets: a user namespace (root inside is an unprivileged id range outside), its own pid, ipc, uts,
mount, cgroup and network namespaces (the network namespace is created by the runtime inside the user
namespace, so it can be checkpointed; the network is attached afterwards by moving a veth in by PID),
``noNewPrivileges``, a minimal capability set, masked and read-only kernel paths, its own hostname, and cgroup
limits for CPU, memory (no swap: the OOM killer acts inside the sandbox) and pids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

OCI_VERSION = "1.0.2"
CPU_PERIOD_US = 100_000
MIB = 1024 * 1024

# Namespaced capabilities a root process in a user namespace needs for ordinary work (package installs,
# chown, su, binding low ports). Not: NET_RAW (raw sockets), MKNOD, AUDIT_WRITE, SYS_ADMIN, NET_ADMIN.
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
)

MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
)

READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# The device nodes every sandbox has. In a user namespace they cannot be created with mknod, and the runtimes
# then bind the HOST's nodes (crun always does for these six, whatever the config lists). With crun the
# sandbox's /dev is therefore a bind mount of a directory the node filled with nodes of the sandbox's own
# (``devnodes``): with /dev a bind mount, crun makes no devices. runc keeps the /dev it makes (a tmpfs, the
# host's nodes bound from linux.devices): only then does it reopen its init's stdio on the sandbox's
# /dev/null, without which CRIU cannot checkpoint the init (its stdio would be the node's null, a file
# outside the sandbox's mounts). The numbers are also the devices cgroup's rules.
DEVICES = ("null", "zero", "full", "tty", "random", "urandom")
DEVICE_NUMBERS = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "tty": (5, 0),
    "random": (1, 8),
    "urandom": (1, 9),
}

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Runtime(StrEnum):
    CRUN = "crun"
    RUNC = "runc"


@dataclass(frozen=True)
class IdRange:
    """Container ids 0..size-1 are host ids host_start..host_start+size-1."""

    host_start: int
    size: int = 65536

    def __post_init__(self) -> None:
        if self.host_start < 1 or self.size < 1:
            raise ValueError("a sandbox's id range must start above 0 on the host and not be empty")


@dataclass(frozen=True)
class Limits:
    vcpus: float
    mem_mib: int
    pids: int = 4096

    def __post_init__(self) -> None:
        if self.vcpus <= 0 or self.mem_mib < 16 or self.pids < 16:
            raise ValueError("vcpus must be positive, mem_mib at least 16, pids at least 16")


@dataclass(frozen=True)
class SandboxSpec:
    hostname: str
    rootfs: str  # absolute path of the (overlay) root filesystem
    ids: IdRange
    limits: Limits
    cgroups_path: str  # e.g. "/corral/vm_x" (cgroupfs) — where the runtime creates the sandbox's cgroup
    args: tuple[str, ...]  # the sandbox's init process
    env: Mapping[str, str] = field(default_factory=dict)
    runtime: Runtime = Runtime.CRUN
    annotations: Mapping[str, str] = field(default_factory=dict)
    seccomp: Mapping[str, Any] | None = None  # the OCI linux.seccomp object
    binds: tuple[tuple[str, str], ...] = ()  # (host file, path inside), mounted read-only
    # the host directory that is the sandbox's /dev, with its own device nodes (``devnodes.make_devices``);
    # required with crun, unused with runc
    devices_dir: str = ""


def _id_map(ids: IdRange) -> list[dict[str, int]]:
    return [{"containerID": 0, "hostID": ids.host_start, "size": ids.size}]


def _dev_mount(runtime: Runtime, devices_dir: str) -> dict[str, Any]:
    if runtime is Runtime.RUNC:
        return {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        }
    if not devices_dir.startswith("/"):
        raise ValueError("a crun sandbox needs its own device nodes: devices_dir (an absolute path)")
    # the sandbox's own /dev (its device nodes, never the host's): a bind, so crun makes none
    return {"destination": "/dev", "type": "bind", "source": devices_dir, "options": ["bind", "rw", "nosuid"]}


def _mounts(runtime: Runtime, devices_dir: str) -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        _dev_mount(runtime, devices_dir),
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",  # noqa: S108 (inside the sandbox)
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
    ]


def _devices(runtime: Runtime) -> list[dict[str, Any]]:
    if runtime is Runtime.CRUN:
        return []  # /dev is the node's (``devices_dir``)
    return [
        {
            "path": f"/dev/{dev}",
            "type": "c",
            "major": DEVICE_NUMBERS[dev][0],
            "minor": DEVICE_NUMBERS[dev][1],
            "fileMode": 0o666,
            "uid": 0,
            "gid": 0,
        }
        for dev in DEVICES
    ]


def _device_rules() -> list[dict[str, Any]]:
    """The devices cgroup: nothing but the standard nodes and pseudo-terminals (runc needs this list on a v1
    host, or it cannot reopen /dev/null inside the sandbox)."""
    rules: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
    for major, minor in (*DEVICE_NUMBERS.values(), (5, 2)):
        rules.append({"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"})
    rules.append({"allow": True, "type": "c", "major": 136, "access": "rwm"})  # /dev/pts/*
    return rules


def build_config(spec: SandboxSpec) -> dict[str, Any]:
    """The whole ``config.json`` for ``spec``: a plain dict, ready for ``json.dump``."""
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "xterm", **spec.env}
    caps = list(CAPABILITIES)
    quota = max(1000, round(spec.limits.vcpus * CPU_PERIOD_US))
    memory = spec.limits.mem_mib * MIB
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(spec.args),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": True,
        },
        "root": {"path": spec.rootfs, "readonly": False},
        "hostname": spec.hostname,
        "mounts": [
            *_mounts(spec.runtime, spec.devices_dir),
            *(
                {
                    "destination": dest,
                    "type": "bind",
                    "source": src,
                    "options": ["bind", "ro", "nosuid", "nodev"],
                }
                for src, dest in spec.binds
            ),
        ],
        "annotations": dict(spec.annotations),
        "linux": {
            "uidMappings": _id_map(spec.ids),
            "gidMappings": _id_map(spec.ids),
            "namespaces": [
                {"type": kind} for kind in ("pid", "ipc", "uts", "mount", "cgroup", "network", "user")
            ],
            "cgroupsPath": spec.cgroups_path,
            # unprivileged ICMP echo sockets: `ping` works without CAP_NET_RAW (the gateway answers it)
            "sysctl": {"net.ipv4.ping_group_range": f"0 {spec.ids.size - 1}"},
            "resources": {
                "devices": _device_rules(),
                "cpu": {"quota": quota, "period": CPU_PERIOD_US},
                "memory": {"limit": memory, "swap": memory},
                "pids": {"limit": spec.limits.pids},
            },
            "devices": _devices(spec.runtime),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            **({"seccomp": dict(spec.seccomp)} if spec.seccomp is not None else {}),
        },
    }
