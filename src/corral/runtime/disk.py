"""Sandbox disks with a real quota: one btrfs filesystem per node on a sparse loop file, one subvolume per
sandbox with a qgroup limit of its ``disk_mib``.

This kernel has no CONFIG_QUOTA (no ext4/XFS project quotas), so btrfs qgroups are the quota that works: a
write past the limit fails inside the sandbox with EDQUOT, and the host's own filesystem is never touched
beyond the loop file's size. Subvolume snapshots also give the state issue O(1) copies of a disk.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from corral.runtime.proc import CommandFailed, run

MIB = 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")


def loop_device_of(image: Path) -> str | None:
    out = run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"])
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().removesuffix(" (deleted)") == str(image):
            return parts[0]
    return None


@dataclass(frozen=True)
class DiskPool:
    """The node's btrfs pool: ``image`` (a sparse file) mounted at ``mountpoint``; volumes under ``vols/``."""

    image: Path
    mountpoint: Path
    size_bytes: int

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

    def unmount(self) -> None:
        """Unmount and detach the pool (its volumes stay in the image file)."""
        if os.path.ismount(self.mountpoint):
            run(["umount", str(self.mountpoint)])
        dev = loop_device_of(self.image) if self.image.exists() else None
        if dev:
            with contextlib.suppress(CommandFailed):
                run(["losetup", "-d", dev])

    def path(self, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad volume name {name!r}")
        return self.vols / name

    def create(self, name: str, limit_mib: int) -> Path:
        """A new subvolume limited to ``limit_mib`` of data."""
        path = self.path(name)
        run(["btrfs", "subvolume", "create", str(path)])
        try:
            run(["btrfs", "qgroup", "limit", f"{limit_mib * MIB}", str(path)])
        except Exception:
            self.delete(name)
            raise
        return path

    def snapshot(self, source: Path, dest: Path, *, readonly: bool) -> None:
        """An O(1) copy-on-write copy of the subvolume ``source`` at ``dest`` (both on this pool)."""
        run(["btrfs", "subvolume", "snapshot", *(["-r"] if readonly else []), str(source), str(dest)])

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
        run(["btrfs", "subvolume", "delete", str(path)])
        if qgroup:
            # still referenced until the cleaner runs; clear-stale at the next start catches it then
            with contextlib.suppress(CommandFailed):
                run(["btrfs", "qgroup", "destroy", qgroup, str(self.mountpoint)])

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
