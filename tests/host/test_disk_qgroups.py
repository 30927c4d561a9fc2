"""The disk pool's qgroup limits hold after captures, on the real kernel (a small loop-mounted pool).

A snapshot made outside the parent qgroup (the capture's CRIU script ran ``btrfs subvolume snapshot -r``
without ``-i 1/1``) made the kernel mark the qgroups inconsistent and stop accounting: ``rfer`` stayed 0, so
every sandbox created after the first hibernate/fork/snapshot could write past its ``disk_mib`` (a full test
run: the disk filler's 400 MiB in a 128 MiB sandbox succeeded). Every snapshot now goes into the parent, and
a pool found inconsistent when the node starts is rescanned (and waited for) before anything runs on it.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.runtime.disk import MIB, DiskPool

pytestmark = pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="needs btrfs-progs")


@pytest.fixture
def pool() -> Iterator[DiskPool]:
    base = Path("/tmp") / f"corral-qg-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    disks = DiskPool(base / "disk.img", base / "disk", 512 * MIB)
    try:
        disks.ensure()
        disks.ensure_parent(400 * MIB)
        yield disks
    finally:
        for name in disks.names():
            disks.delete(name)
        for sub in base.joinpath("disk").glob("cap-*"):
            disks.delete_subvolume(sub)
        disks.unmount()
        shutil.rmtree(base)


def inconsistent(disks: DiskPool) -> bool:
    return not disks.accounting_consistent()


def write(path: Path, mib: int) -> subprocess.CompletedProcess[str]:
    argv = ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync", "status=none"]
    return subprocess.run(argv, capture_output=True, text=True)


def assert_limit_holds(disks: DiskPool, name: str) -> None:
    volume = disks.create(name, 32)
    done = write(volume / "big", 96)
    assert done.returncode != 0, done
    assert "Disk quota exceeded" in done.stderr, done
    assert (volume / "big").stat().st_size <= 32 * MIB


def test_a_capture_keeps_the_accounting_and_the_limits(pool: DiskPool) -> None:
    volume = pool.create("vm-a", 32)
    assert write(volume / "data", 8).returncode == 0
    cap = pool.mountpoint / "cap-a"
    # as the capture's CRIU action script runs it (a shell line, the command from the pool)
    subprocess.run(["sh", "-c", " ".join(pool.snapshot_argv(volume, cap, readonly=True))], check=True)
    assert not inconsistent(pool)
    pool.clone(cap, "vm-fork", 32)
    assert not inconsistent(pool)
    assert_limit_holds(pool, "vm-b")


def test_a_pool_left_inconsistent_is_recounted_before_use(pool: DiskPool) -> None:
    volume = pool.create("vm-a", 32)
    assert write(volume / "data", 8).returncode == 0
    # what an older Corral's capture did: a snapshot outside the parent qgroup
    subprocess.run(
        ["btrfs", "subvolume", "snapshot", "-r", str(volume), str(pool.mountpoint / "cap-old")],
        check=True,
        capture_output=True,
    )
    cap = pool._qgroup_id(pool.mountpoint / "cap-old")
    assert cap is not None
    argv = ["btrfs", "qgroup", "assign", "--no-rescan", cap, "1/1", str(pool.mountpoint)]
    subprocess.run(argv, capture_output=True, check=True)
    assert inconsistent(pool)
    pool.ensure_parent(400 * MIB)  # what the node does when it starts
    assert not inconsistent(pool)
    assert_limit_holds(pool, "vm-b")
