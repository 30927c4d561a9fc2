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
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def is_pure_v2(root: Path = CGROUP_ROOT) -> bool:
    return (root / "cgroup.controllers").exists()


def ensure_hugetlb_v1(root: Path = CGROUP_ROOT) -> bool:
    """crun refuses a hybrid host whose unified hierarchy holds controllers ("cgroups in hybrid mode not
    supported"): on such hosts hugetlb sits there, so mount it as its own v1 hierarchy. Idempotent; returns
    True when it mounted it now."""
    unified = root / "unified" / "cgroup.controllers"
    if is_pure_v2(root) or not unified.exists() or not unified.read_text().split():
        return False
    target = root / "hugetlb"
    if os.path.ismount(target):
        return False
    target.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", str(target)], check=True, capture_output=True
    )
    return True


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
