"""Sandbox disks with a real quota: one btrfs filesystem per node on a sparse loop file, one subvolume per
sandbox with a qgroup limit of its ``disk_mib``.

This kernel has no CONFIG_QUOTA (no ext4/XFS project quotas), so btrfs qgroups are the quota that works: a
write past the limit fails inside the sandbox with EDQUOT, and the host's own filesystem is never touched
beyond the loop file's size. Subvolume snapshots also give the state issue O(1) copies of a disk.

Every subvolume (and the top level, where captures keep their memory images) belongs to one parent qgroup
(``PARENT_QGROUP``) limited below the pool's size (``parent_limit_bytes``): the sandboxes together can never
fill the filesystem, so btrfs keeps room for its metadata and never forces itself read-only, and the sparse
file never grows past what the host's filesystem had free (less a reserve) when the node started.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from corral.runtime.proc import CommandFailed, run

MIB = 1024 * 1024
GIB = 1024 * MIB
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")
PARENT_QGROUP = "1/1"
# btrfs's own share of the pool: metadata (DUP), the global reserve, chunk slack
META_SHARE = 0.1
META_MIN = 256 * MIB


def host_reserve_bytes(fs_size: int) -> int:
    """What the node leaves free on its data directory's filesystem by default: 5% of it, at least 1 GiB
    (the database, logs, snapshots and the rest of the host)."""
    return max(GIB, fs_size // 20)


def auto_pool_bytes(free: int, reserve: int) -> int:
    """The pool's size when not configured: the filesystem's free space less the reserve, at least 1 GiB."""
    return max(GIB, (free - reserve) // MIB * MIB)


def parent_limit_bytes(pool: int, allocated: int, host_free: int, host_reserve: int) -> int:
    """The parent qgroup's limit: below the pool's size by btrfs's share (so it never runs out of metadata
    room), and no more than what the sparse file already holds plus what the host can still give it (so
    the host's filesystem never fills under it). At least 64 MiB."""
    room = min(pool, allocated + host_free - host_reserve)
    return max(64 * MIB, (room - max(META_MIN, int(room * META_SHARE))) // MIB * MIB)


def loop_device_of(image: Path) -> str | None:
    out = run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"])
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().removesuffix(" (deleted)") == str(image):
            return parts[0]
    return None


def mount_holders(device: str, proc: Path = Path("/proc")) -> list[str]:
    """The processes (``pid (comm)``) whose mount namespace has ``device`` mounted, one per namespace."""
    seen: set[str] = set()
    out: list[str] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ns = os.readlink(entry / "ns" / "mnt")
            if ns in seen:
                continue
            if any(
                line.partition(" - ")[2].split()[1:2] == [device] for line in (entry / "mountinfo").open()
            ):
                seen.add(ns)
                out.append(f"{entry.name} ({(entry / 'comm').read_text().strip()})")
        except OSError:
            continue
    return out


@dataclass
class DiskPool:
    """The node's btrfs pool: ``image`` (a sparse file) mounted at ``mountpoint``; volumes under ``vols/``."""

    image: Path
    mountpoint: Path
    size_bytes: int
    parent_limit: int | None = None  # the parent qgroup's limit, once ``ensure_parent`` set it
    _deleting: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def vols(self) -> Path:
        return self.mountpoint / "vols"

    def ensure(self) -> None:
        """Make, attach and mount the pool if it is not already (idempotent; quick when mounted)."""
        if os.path.ismount(self.mountpoint):
            self.vols.mkdir(mode=0o711, exist_ok=True)
            return
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        fresh = not self.image.exists()
        if fresh:
            with open(self.image, "wb") as f:
                f.truncate(self.size_bytes)
            run(["mkfs.btrfs", "-q", "-f", str(self.image)])
        run(["mount", "-o", "loop,noatime", str(self.image), str(self.mountpoint)])
        try:
            run(["btrfs", "quota", "enable", str(self.mountpoint)])
            self.vols.mkdir(mode=0o711, exist_ok=True)
        except Exception:
            self.unmount()
            raise

    def ensure_parent(self, limit_bytes: int) -> None:
        """The parent qgroup, the top level and every volume in it, limited to ``limit_bytes`` (idempotent:
        volumes made by an older Corral are assigned too)."""
        mp = str(self.mountpoint)
        self.keep_accounting()
        shown = run(["btrfs", "qgroup", "show", "-p", "--raw", mp])
        if not any(line.split()[:1] == [PARENT_QGROUP] for line in shown.splitlines()):
            run(["btrfs", "qgroup", "create", PARENT_QGROUP, mp])
        # columns: qgroup, referenced, exclusive, parents, path
        members = {p[0]: p[3] for p in map(str.split, shown.splitlines()) if len(p) >= 4 and p[0][:2] == "0/"}
        for qgroup, parent in members.items():
            if PARENT_QGROUP not in parent.split(","):
                with contextlib.suppress(CommandFailed):  # a stale qgroup of a deleted subvolume
                    run(["btrfs", "qgroup", "assign", qgroup, PARENT_QGROUP, mp])
        if not self.accounting_consistent():
            # limits do not hold while the kernel does not account (captures an older Corral took outside
            # the parent, an assign above): recount before any sandbox runs
            self.rescan(wait=True)
        self.set_parent_limit(limit_bytes)

    def _sysfs(self) -> Path | None:
        """The pool's directory under /sys/fs/btrfs (by its filesystem's UUID)."""
        out = run(["btrfs", "filesystem", "show", str(self.mountpoint)])
        found = re.search(r"uuid: ([0-9a-f-]{36})", out)
        return Path("/sys/fs/btrfs") / found.group(1) if found else None

    def keep_accounting(self) -> None:
        """Account every subvolume delete in full: by default the kernel skips the accounting of a deleted
        subvolume whose tree is 3 levels or more and marks the qgroups inconsistent instead, and from then on
        the parent qgroup keeps counting what was deleted (the pool looks fuller and fuller)."""
        sysfs = self._sysfs()
        with contextlib.suppress(OSError):
            if sysfs is not None:
                (sysfs / "qgroups" / "drop_subtree_threshold").write_text("8")

    def accounting_consistent(self) -> bool:
        """False when the kernel marked the qgroups inconsistent (a rescan is due)."""
        sysfs = self._sysfs()
        try:
            return sysfs is None or (sysfs / "qgroups" / "inconsistent").read_text().strip() != "1"
        except OSError:
            return True

    def rescan(self, *, wait: bool = False) -> None:
        """Start a quota rescan (it runs in the kernel; the numbers are right once it ends); ``wait``: until
        it ends (one already running is waited for)."""
        if wait:
            run(["btrfs", "quota", "rescan", "-w", str(self.mountpoint)])
            return
        with contextlib.suppress(CommandFailed):  # one already running
            run(["btrfs", "quota", "rescan", str(self.mountpoint)])

    def set_parent_limit(self, limit_bytes: int) -> None:
        with self._deleting:  # not while a delete has lifted it
            run(["btrfs", "qgroup", "limit", str(limit_bytes), PARENT_QGROUP, str(self.mountpoint)])
            self.parent_limit = limit_bytes

    def parent_usage(self) -> tuple[int, int | None]:
        """The parent qgroup's referenced bytes and limit (what every sandbox and capture holds together)."""
        out = run(["btrfs", "qgroup", "show", "-r", "--raw", str(self.mountpoint)])
        for line in out.splitlines():
            parts = line.split()
            if parts[:1] == [PARENT_QGROUP] and len(parts) >= 4 and parts[1].isdigit():
                return int(parts[1]), int(parts[3]) if parts[3].isdigit() else None
        return 0, None

    def allocated_bytes(self) -> int:
        """What the sparse file takes on the host's filesystem now."""
        try:
            return self.image.stat().st_blocks * 512
        except FileNotFoundError:
            return 0

    def unmount(self) -> list[str]:
        """Unmount and detach the pool (its volumes stay in the image file). The mount point is removed
        too: the kernel then detaches the copies of the pool's mount that other mount namespaces hold (a
        process started with ``ip netns exec`` or ``unshare -m`` after the pool was mounted, this node's or
        another instance's: on a host whose ``/`` is private an unmount does not reach them). Returns what
        stays (a loop device still attached, with the processes whose namespaces still hold it)."""
        if os.path.ismount(self.mountpoint):
            run(["umount", str(self.mountpoint)])
        with contextlib.suppress(FileNotFoundError, OSError):
            self.mountpoint.rmdir()
        dev = loop_device_of(self.image) if self.image.exists() else None
        if not dev:
            return []
        with contextlib.suppress(CommandFailed):
            run(["losetup", "-d", dev])  # detached now, or (autoclear) as soon as the last holder lets go
        if loop_device_of(self.image) is None:
            return []
        holders = mount_holders(dev)
        return [
            f"{dev} stays attached to {self.image}: still mounted in " + (", ".join(holders) or "unknown")
        ]

    def path(self, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad volume name {name!r}")
        return self.vols / name

    def create(self, name: str, limit_mib: int) -> Path:
        """A new subvolume limited to ``limit_mib`` of data."""
        path = self.path(name)
        run(["btrfs", "subvolume", "create", "-i", PARENT_QGROUP, str(path)])
        try:
            run(["btrfs", "qgroup", "limit", f"{limit_mib * MIB}", str(path)])
        except Exception:
            self.delete(name)
            raise
        return path

    @staticmethod
    def snapshot_argv(source: Path, dest: Path, *, readonly: bool, btrfs: str = "btrfs") -> list[str]:
        """The command that snapshots ``source`` at ``dest`` into the parent qgroup. Every snapshot must be
        made with ``-i PARENT_QGROUP``: one made outside it shares its extents with the parent's members,
        the kernel marks the qgroups inconsistent and stops accounting (``rfer`` no longer grows), and no
        qgroup limit holds any more, a sandbox's nor the parent's, until a rescan ends."""
        return [
            btrfs,
            "subvolume",
            "snapshot",
            "-i",
            PARENT_QGROUP,
            *(["-r"] if readonly else []),
            str(source),
            str(dest),
        ]

    def snapshot(self, source: Path, dest: Path, *, readonly: bool) -> None:
        """An O(1) copy-on-write copy of the subvolume ``source`` at ``dest`` (both on this pool)."""
        run(self.snapshot_argv(source, dest, readonly=readonly))

    def clone(self, source: Path, name: str, limit_mib: int) -> Path:
        """A new writable volume ``name`` whose content is ``source``'s (a captured disk), limited like
        ``create``: unchanged data stays shared with ``source`` and every other clone of it."""
        path = self.path(name)
        self.snapshot(source, path, readonly=False)
        try:
            run(["btrfs", "qgroup", "limit", f"{limit_mib * MIB}", str(path)])
        except Exception:
            self.delete(name)
            raise
        return path

    def delete_subvolume(self, path: Path) -> None:
        """Delete a subvolume anywhere on the pool (a volume, a captured disk) and its qgroup; missing is fine."""
        if not path.exists():
            return
        qgroup = self._qgroup_id(path)
        try:
            run(["btrfs", "subvolume", "delete", str(path)])
        except CommandFailed as exc:
            if "quota" not in str(exc).lower():
                raise
            self._delete_over_quota(path, qgroup)
        if qgroup:
            # still referenced until the cleaner runs; clear-stale at the next start catches it then
            with contextlib.suppress(CommandFailed):
                run(["btrfs", "qgroup", "destroy", qgroup, str(self.mountpoint)])

    def _delete_over_quota(self, path: Path, qgroup: str | None) -> None:
        """A delete needs a little metadata space charged to the subvolume and its parent: when either is at
        its limit (a sandbox filled its disk, or all of them the pool) the limits are lifted for the delete
        and the parent's put back (the pool's own margin below its size covers the moment)."""
        mp = str(self.mountpoint)
        with self._deleting:
            if qgroup:
                with contextlib.suppress(CommandFailed):
                    run(["btrfs", "qgroup", "limit", "none", qgroup, mp])
            try:
                run(["btrfs", "subvolume", "delete", str(path)])
            except CommandFailed as exc:
                if self.parent_limit is None or "quota" not in str(exc).lower():
                    raise
                run(["btrfs", "qgroup", "limit", "none", PARENT_QGROUP, mp])
                try:
                    run(["btrfs", "subvolume", "delete", str(path)])
                finally:
                    run(["btrfs", "qgroup", "limit", str(self.parent_limit), PARENT_QGROUP, mp])

    def delete(self, name: str) -> None:
        """Delete the volume and its qgroup. Missing is fine."""
        self.delete_subvolume(self.path(name))

    def names(self) -> set[str]:
        if not self.vols.is_dir():
            return set()
        return {p.name for p in self.vols.iterdir()}

    def clear_stale(self) -> None:
        with contextlib.suppress(CommandFailed):
            run(["btrfs", "qgroup", "clear-stale", str(self.mountpoint)])

    def usage_bytes(self, name: str) -> int | None:
        """Bytes referenced by the volume (its qgroup's ``rfer``)."""
        qgroup = self._qgroup_id(self.path(name))
        if not qgroup:
            return None
        out = run(["btrfs", "qgroup", "show", "--raw", "-r", str(self.mountpoint)])
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == qgroup and len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
        return None

    @staticmethod
    def _qgroup_id(path: Path) -> str | None:
        try:
            out = run(["btrfs", "subvolume", "show", str(path)])
        except CommandFailed:
            return None
        for line in out.splitlines():
            key, _, value = line.strip().partition(":")
            if key.strip() == "Subvolume ID":
                return f"0/{value.strip()}"
        return None
