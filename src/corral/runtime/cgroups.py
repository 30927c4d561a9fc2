"""The host's cgroup layout: what crun needs on a v1 hybrid host, and finding or removing a sandbox's cgroups.

Sandboxes live under one parent per node (``corral-<node id>``), in every v1 controller hierarchy on a hybrid
host, or once in the unified tree on a pure v2 host. The runtime removes a sandbox's own cgroup on delete;
the parent and anything left by a crash are removed here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def is_pure_v2(root: Path = CGROUP_ROOT) -> bool:
    return (root / "cgroup.controllers").exists()


def controllers_to_mount(proc_cgroups: str, mountinfo: str, unified_controllers: str) -> list[str]:
    """The v1 controllers to mount on a hybrid host before crun runs (pure: the texts of /proc/cgroups,
    /proc/self/mountinfo and the unified tree's cgroup.controllers).

    crun refuses a hybrid host whose unified tree holds any controller ("cgroups in hybrid mode not
    supported"). A controller is in that tree when no v1 hierarchy has it (hugetlb on this kernel); it is
    also bound to come back there when it sits in a v1 hierarchy that nothing mounts any more (unmounted
    while it still had child cgroups: the kernel keeps it, then lets it go at a moment of its own, and from
    then on every boot and restore fails). Both kinds are mounted as their own hierarchy: a new one for the
    first, the kept one again for the second (the kernel reuses it), which pins it."""
    mounted: set[str] = set()
    for line in mountinfo.splitlines():
        _fields, sep, tail = line.partition(" - ")
        fields = tail.split()
        if sep and len(fields) >= 3 and fields[0] == "cgroup":
            mounted.update(fields[2].split(","))
    kept = {name for name, hierarchy in v1_hierarchies(proc_cgroups).items() if hierarchy != "0"}
    return sorted((set(unified_controllers.split()) | kept) - mounted)


def v1_hierarchies(proc_cgroups: str) -> dict[str, str]:
    """Each enabled controller's v1 hierarchy id, from the text of /proc/cgroups (``"0"``: in no v1
    hierarchy; on a hybrid host, in the unified tree if it is a v2 controller)."""
    out: dict[str, str] = {}
    for line in proc_cgroups.splitlines():
        fields = line.split()
        if not line.startswith("#") and len(fields) >= 4 and fields[3] == "1":
            out[fields[0]] = fields[1]
    return out


def mount_v1(controller: str, target: Path, *, timeout: float = 10.0) -> None:
    """``controller`` as a v1 hierarchy at ``target`` (a hierarchy the kernel is still tearing down makes
    mount wait for it: bounded)."""
    subprocess.run(
        ["mount", "-t", "cgroup", "-o", controller, "cgroup", str(target)],
        check=True,
        capture_output=True,
        timeout=timeout,
    )


def ensure_hybrid_layout(
    root: Path = CGROUP_ROOT,
    *,
    proc: Path = Path("/proc"),
    mount: Callable[[str, Path], None] = mount_v1,
) -> list[str]:
    """Mount, as ``root/<name>``, each controller ``controllers_to_mount`` names (nothing on a pure v2
    host, or on a hybrid one that is already as crun needs it). Idempotent; returns what it mounted."""
    unified = root / "unified" / "cgroup.controllers"
    if is_pure_v2(root) or not unified.exists():
        return []
    wanted = controllers_to_mount(_read(proc / "cgroups"), _read(proc / "self" / "mountinfo"), _read(unified))
    for name in wanted:
        target = root / name
        target.mkdir(exist_ok=True)
        mount(name, target)
    return wanted


def unified_is_empty(root: Path = CGROUP_ROOT) -> bool:
    """True unless the unified tree of a hybrid host holds a controller (what crun refuses)."""
    unified = root / "unified" / "cgroup.controllers"
    return is_pure_v2(root) or not _read(unified).split()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """Every hierarchy a sandbox's cgroup can appear in: the unified tree on a pure v2 host, else each
    mounted v1 controller (and the named/unified ones) under ``root``."""
    if is_pure_v2(root):
        return [root]
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.is_symlink() and (os.path.ismount(p) or (p / "cgroup.procs").exists())
    )


def parent_dirs(parent: str, root: Path = CGROUP_ROOT) -> list[Path]:
    return [h / parent for h in hierarchies(root) if (h / parent).is_dir()]


def children(parent: str, root: Path = CGROUP_ROOT) -> set[str]:
    """Names of the sandbox cgroups under ``parent`` in any hierarchy."""
    names: set[str] = set()
    for d in parent_dirs(parent, root):
        names.update(p.name for p in d.iterdir() if p.is_dir())
    return names


def procs(parent: str, name: str, root: Path = CGROUP_ROOT) -> set[int]:
    found: set[int] = set()
    for d in parent_dirs(parent, root):
        f = d / name / "cgroup.procs"
        if f.exists():
            found.update(int(x) for x in f.read_text().split())
    return found


def remove(parent: str, name: str | None = None, root: Path = CGROUP_ROOT) -> None:
    """rmdir ``parent/name`` (or the whole ``parent``) bottom-up in every hierarchy, killing what still runs
    there first. Missing directories are fine."""
    for d in parent_dirs(parent, root):
        top = d / name if name else d
        if not top.exists():
            continue
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            _kill_all(Path(dirpath))
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(dirpath)


def _kill_all(cgroup: Path) -> None:
    procs_file = cgroup / "cgroup.procs"
    try:
        pids = [int(x) for x in procs_file.read_text().split()]
    except OSError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    if pids:
        # rmdir only succeeds once the killed tasks are gone
        for _ in range(200):
            try:
                if not procs_file.read_text().split():
                    break
            except OSError:
                break
            time.sleep(0.005)


def prune(parent: str, root: Path = CGROUP_ROOT) -> None:
    """rmdir ``parent`` where it has no sandbox left (a running sandbox keeps it, untouched)."""
    for d in parent_dirs(parent, root):
        with contextlib.suppress(OSError):
            os.rmdir(d)


def read_stat(parent: str, name: str, controller: str, key: str, root: Path = CGROUP_ROOT) -> str | None:
    """One cgroup file's content, from the v1 controller hierarchy or the v2 tree."""
    base = root if is_pure_v2(root) else root / controller
    f = base / parent / name / key
    try:
        return f.read_text().strip()
    except OSError:
        return None


def host_memory_bytes(meminfo: str) -> int:
    """MemTotal from the text of /proc/meminfo (pure)."""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no MemTotal in /proc/meminfo")


def memory_reserve_bytes(total: int) -> int:
    """What the node leaves to the host by default (the control plane, the egress proxy, the page cache):
    10% of its memory, at least 1 GiB."""
    return max(1 << 30, total // 10)


def limit_parent_memory(parent: str, limit_bytes: int, root: Path = CGROUP_ROOT) -> Path:
    """Make the node's parent cgroup in the memory hierarchy (v1) or the unified tree (v2) and limit what
    every sandbox under it may use together to ``limit_bytes``. Returns the cgroup's directory."""
    if is_pure_v2(root):
        control = root / "cgroup.subtree_control"
        if "memory" not in _read(control).split():
            control.write_text("+memory")
        d = root / parent
        d.mkdir(exist_ok=True)
        (d / "memory.max").write_text(str(limit_bytes))
        return d
    d = root / "memory" / parent
    d.mkdir(exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(str(limit_bytes))
    return d


def parent_memory(parent: str, root: Path = CGROUP_ROOT) -> tuple[int | None, int | None]:
    """The parent cgroup's memory in use and its limit, in bytes (None where unreadable)."""
    if is_pure_v2(root):
        used, limit = _read(root / parent / "memory.current"), _read(root / parent / "memory.max")
    else:
        d = root / "memory" / parent
        used, limit = _read(d / "memory.usage_in_bytes"), _read(d / "memory.limit_in_bytes")
    return (int(used) if used.strip().isdigit() else None, int(limit) if limit.strip().isdigit() else None)
