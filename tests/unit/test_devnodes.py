"""A sandbox's own /dev (``devnodes.make_devices``), made for real (tests run as root): a tmpfs of its own, not
``nodev``, owned by the sandbox's root; character devices with the host's numbers, 0666, host root's, never the
host's inodes; the mount points and symlinks a runtime's /dev has; a tampered node made again."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.runtime import devnodes, rootfs
from corral.runtime.spec import DEVICE_NUMBERS, DEVICES

ROOT_UID = 200_000


@pytest.fixture
def devdir(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "dev"
    yield target
    for point in rootfs.mounts_under(target):
        rootfs.unmount(point)


def test_each_node_is_a_private_copy_of_the_hosts_device(devdir: Path) -> None:
    assert devnodes.make_devices(devdir, ROOT_UID) == devdir
    assert os.path.ismount(devdir)
    top = os.stat(devdir)
    assert (top.st_uid, top.st_gid, stat.S_IMODE(top.st_mode)) == (ROOT_UID, ROOT_UID, 0o755)
    assert set(DEVICE_NUMBERS) == set(DEVICES)
    for name, (major, minor) in DEVICE_NUMBERS.items():
        st, host = os.lstat(devdir / name), os.stat(f"/dev/{name}")
        assert stat.S_ISCHR(st.st_mode)
        assert st.st_rdev == os.makedev(major, minor) == host.st_rdev
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o666, 0, 0)
        assert (st.st_dev, st.st_ino) != (host.st_dev, host.st_ino)
    with open(devdir / "null", "r+b") as null:  # usable: the tmpfs is not nodev
        assert null.write(b"x") == 1
        assert null.read() == b""
    with open(devdir / "zero", "rb") as zero:
        assert zero.read(4) == b"\0\0\0\0"
    for name in devnodes.MOUNT_POINTS:
        assert (devdir / name).is_dir()
        assert os.stat(devdir / name).st_uid == ROOT_UID
    assert {name: os.readlink(devdir / name) for name in devnodes.SYMLINKS} == devnodes.SYMLINKS
    expected = {*DEVICES, *devnodes.MOUNT_POINTS, *devnodes.SYMLINKS}
    assert {p.name for p in devdir.iterdir()} == expected


def test_a_tampered_node_is_made_again_and_the_host_keeps_its_own(devdir: Path) -> None:
    host_before = os.stat("/dev/null")
    devnodes.make_devices(devdir, ROOT_UID)
    os.chmod(devdir / "null", 0o600)
    (devdir / "full").unlink()
    os.mknod(devdir / "full", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # the wrong device
    (devdir / "ptmx").unlink()
    devnodes.make_devices(devdir, ROOT_UID)  # again, on the mounted tmpfs
    assert stat.S_IMODE(os.lstat(devdir / "null").st_mode) == 0o666
    assert os.lstat(devdir / "full").st_rdev == os.makedev(1, 7)
    assert os.readlink(devdir / "ptmx") == "pts/ptmx"
    host = os.stat("/dev/null")
    assert (host.st_mode, host.st_uid, host.st_gid) == (host_before.st_mode, 0, 0)
    assert len(rootfs.mounts_under(devdir)) == 1  # mounted once
