"""The local snapshot store on real files (GNU tar, no kernel features): what it writes, that it refuses any
damage before anything is restored, and that unpacking gives back owners, modes, xattrs and whiteouts."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.node.snapstore import LocalSnapshotStore, SnapshotDamaged


def make_capture(root: Path, *, memory: bool = True) -> tuple[Path, Path | None]:
    """A captured disk (``upper`` with a file, a directory, a symlink, a whiteout) and CRIU-like images."""
    disk = root / "disk"
    upper = disk / "upper"
    (upper / "root").mkdir(parents=True)
    (upper / "root" / "file").write_text("hello\n")
    os.chown(upper / "root" / "file", 100000, 100000)
    (upper / "root" / "file").chmod(0o640)
    (upper / "root" / "link").symlink_to("file")
    os.mknod(upper / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # an overlayfs whiteout
    os.setxattr(upper / "root", "trusted.overlay.opaque", b"y")
    mem = None
    if memory:
        mem = root / "memory"
        mem.mkdir()
        (mem / "inventory.img").write_bytes(b"inv")
        (mem / "pages-1.img").write_bytes(os.urandom(4096))
    return disk, mem


@pytest.fixture
def store(tmp_path: Path) -> LocalSnapshotStore:
    return LocalSnapshotStore(tmp_path / "store")


def test_put_writes_the_documented_layout_and_verifies(store: LocalSnapshotStore, tmp_path: Path) -> None:
    disk, mem = make_capture(tmp_path / "cap")
    size = store.put("snap_a", disk, mem)
    base = store.root / "snap_a"
    assert {p.name for p in base.iterdir()} == {"disk.tar", "memory", "manifest.json"}
    manifest = json.loads((base / "manifest.json").read_text())
    assert set(manifest["files"]) == {"disk.tar", "memory/inventory.img", "memory/pages-1.img"}
    assert size == sum(f["size"] for f in manifest["files"].values())
    assert store.storage_key("snap_a") == "snapshots/snap_a"
    store.verify("snap_a")
    assert store.memory_dir("snap_a") == base / "memory"
    assert not list(store.root.glob(".*"))  # no staging left


def test_restore_disk_gives_back_owners_modes_links_xattrs_and_whiteouts(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    disk, mem = make_capture(tmp_path / "cap")
    store.put("snap_a", disk, mem)
    volume = tmp_path / "vol"
    volume.mkdir()
    store.restore_disk("snap_a", volume)
    f = volume / "upper" / "root" / "file"
    st = f.stat()
    assert (f.read_text(), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        "hello\n",
        100000,
        100000,
        0o640,
    )
    assert os.readlink(volume / "upper" / "root" / "link") == "file"
    gone = (volume / "upper" / "gone").lstat()
    assert stat.S_ISCHR(gone.st_mode)
    assert gone.st_rdev == 0
    assert os.getxattr(volume / "upper" / "root", "trusted.overlay.opaque") == b"y"


def test_a_disk_only_snapshot_has_no_memory(store: LocalSnapshotStore, tmp_path: Path) -> None:
    disk, _ = make_capture(tmp_path / "cap", memory=False)
    store.put("snap_d", disk, None)
    store.verify("snap_d")
    assert store.memory_dir("snap_d") is None


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES: dict[str, Callable[[Path], object]] = {
    "a flipped byte in the disk": lambda b: _flip(b / "disk.tar"),
    "a truncated disk": lambda b: os.truncate(b / "disk.tar", 100),
    "a flipped byte in a memory image": lambda b: _flip(b / "memory" / "pages-1.img"),
    "a missing memory image": lambda b: (b / "memory" / "pages-1.img").unlink(),
    "an extra file": lambda b: (b / "memory" / "extra.img").write_bytes(b"x"),
    "no manifest": lambda b: (b / "manifest.json").unlink(),
    "a garbled manifest": lambda b: (b / "manifest.json").write_text("{"),
    "a manifest without the disk": lambda b: (b / "manifest.json").write_text(json.dumps({"files": {}})),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_any_damage_is_refused(store: LocalSnapshotStore, tmp_path: Path, damage: str) -> None:
    disk, mem = make_capture(tmp_path / "cap")
    store.put("snap_a", disk, mem)
    DAMAGES[damage](store.root / "snap_a")
    with pytest.raises(SnapshotDamaged):
        store.verify("snap_a")


def test_a_missing_snapshot_is_damaged_and_delete_is_idempotent(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    with pytest.raises(SnapshotDamaged):
        store.verify("snap_none")
    disk, mem = make_capture(tmp_path / "cap")
    store.put("snap_a", disk, mem)
    store.delete("snap_a")
    store.delete("snap_a")
    assert not store.exists("snap_a")


def test_a_failed_put_leaves_nothing(store: LocalSnapshotStore, tmp_path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017,PT011 (tar fails: there is no upper)
        store.put("snap_a", tmp_path / "nothing", None)
    assert list(store.root.iterdir()) == []


@pytest.mark.parametrize("key", ["", "../x", "a/b", ".hidden"])
def test_keys_cannot_leave_the_store(store: LocalSnapshotStore, key: str) -> None:
    with pytest.raises(ValueError, match="bad snapshot key"):
        store.verify(key)
