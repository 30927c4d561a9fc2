"""Where snapshots are kept: a small interface, and the local directory that implements it by default.

Layout of the local store (``CORRAL_SNAPSHOTS_DIR``, default ``<data dir>/snapshots``)::

    <root>/<snapshot id>/
        disk.tar          the sandbox's upper layer (its changes over the image), with owners, modes, xattrs
                          and overlayfs whiteouts, as GNU tar writes them
        memory/*.img      CRIU's images of its processes (absent for a disk-only snapshot)
        manifest.json     written last: {"version": 1, "files": {relative path: {"sha256", "size"}}}

A snapshot is complete when its manifest exists; every file is checked against it before anything is
restored from it (``verify``), so a damaged or truncated snapshot is refused, never half-restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Protocol

from corral.runtime.proc import CommandFailed, run

MANIFEST = "manifest.json"
DISK = "disk.tar"
MEMORY = "memory"
CHUNK = 1 << 20


class SnapshotDamaged(Exception):
    """A stored snapshot is missing, incomplete, or does not match its checksums."""


class SnapshotStore(Protocol):
    def storage_key(self, key: str) -> str: ...

    def put(self, key: str, upper_parent: Path, memory: Path | None) -> int:
        """Store the upper layer found at ``upper_parent/upper`` and the CRIU images in ``memory``; returns the
        bytes stored."""
        ...

    def verify(self, key: str) -> None: ...

    def restore_disk(self, key: str, volume: Path) -> None:
        """Unpack the stored upper layer into ``volume`` (a new, empty sandbox volume)."""
        ...

    def memory_dir(self, key: str) -> Path | None:
        """A local directory with the CRIU images (None: a disk-only snapshot)."""
        ...

    def delete(self, key: str) -> None: ...


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class LocalSnapshotStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad snapshot key {key!r}")
        return self.root / key

    def storage_key(self, key: str) -> str:
        return f"snapshots/{key}"

    def put(self, key: str, upper_parent: Path, memory: Path | None) -> int:
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
        final = self._dir(key)
        staging = self.root / f".{key}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o755)
        try:
            run(
                [
                    "tar", "--create", "--file", str(staging / DISK), "--directory", str(upper_parent),
                    "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse", "upper",
                ],
                timeout=3600,
            )  # fmt: skip
            if memory is not None:
                shutil.copytree(memory, staging / MEMORY)
                os.chmod(staging / MEMORY, 0o755)  # noqa: S103 (the restored init, root of the sandbox, reads it)
            sizes = {str(p.relative_to(staging)): p.stat().st_size for p in staging.rglob("*") if p.is_file()}
            files = {
                rel: {"sha256": _sha256(staging / rel), "size": size} for rel, size in sorted(sizes.items())
            }
            (staging / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return sum(sizes.values())

    def _manifest(self, key: str) -> dict[str, dict[str, object]]:
        path = self._dir(key) / MANIFEST
        try:
            data = json.loads(path.read_text())
            files = data["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SnapshotDamaged("the snapshot's manifest is missing or unreadable") from exc
        if not isinstance(files, dict) or DISK not in files:
            raise SnapshotDamaged("the snapshot's manifest is incomplete")
        return files

    def verify(self, key: str) -> None:
        base = self._dir(key)
        files = self._manifest(key)
        for rel, want in files.items():
            path = base / rel
            if not path.is_file():
                raise SnapshotDamaged(f"the snapshot lacks {rel}")
            if path.stat().st_size != want.get("size") or _sha256(path) != want.get("sha256"):
                raise SnapshotDamaged(f"the snapshot's {rel} does not match its checksum")
        present = {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()} - {MANIFEST}
        if present - set(files):
            raise SnapshotDamaged("the snapshot holds files its manifest does not list")

    def restore_disk(self, key: str, volume: Path) -> None:
        try:
            run(
                [
                    "tar", "--extract", "--file", str(self._dir(key) / DISK), "--directory", str(volume),
                    "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--preserve-permissions",
                ],
                timeout=3600,
            )  # fmt: skip
        except CommandFailed as exc:
            raise SnapshotDamaged("the snapshot's disk could not be unpacked") from exc

    def memory_dir(self, key: str) -> Path | None:
        files = self._manifest(key)
        return self._dir(key) / MEMORY if any(k.startswith(MEMORY + "/") for k in files) else None

    def delete(self, key: str) -> None:
        shutil.rmtree(self._dir(key), ignore_errors=True)

    def exists(self, key: str) -> bool:
        return (self._dir(key) / MANIFEST).exists()
