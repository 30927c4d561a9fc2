"""A sandbox's own /dev: a tmpfs the node mounts in the sandbox's bundle and fills (as host root) with the device
nodes every sandbox has (null, zero, full, random, urandom, tty: ``mknod`` with the host's numbers, mode 0666,
owner root), the mount points of /dev/pts, /dev/shm and /dev/mqueue, and the usual symlinks. The runtime
bind-mounts it as the sandbox's /dev.

Why not the runtime's own /dev: in a user namespace crun (like runc) binds the HOST's /dev/null, zero, full,
random, urandom and tty into every sandbox, whatever the config lists, so the sandbox's nodes were the host's
inodes, and any change of their attributes by something acting for the sandbox changed the host's. Both
runtimes skip making devices when /dev itself is a bind mount; then every node is this one.

One /dev per sandbox (each fork child and each restore gets its own bundle, so its own tmpfs): what happens to
one sandbox's nodes never reaches another's or the host's. The directory belongs to the sandbox's root (as a
runtime's /dev tmpfs does); the nodes belong to host root, so the sandbox cannot change their attributes. The
tmpfs is named ``tmpfs`` to the kernel, so the mount table a sandbox reads shows no host path; it is unmounted
with the bundle."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from corral.runtime import syscalls
from corral.runtime.spec import DEVICE_NUMBERS

MS_NOSUID = 0x2
MS_STRICTATIME = 1 << 24
SIZE = "65536k"  # what the runtimes' own /dev tmpfs had
MOUNT_POINTS = ("pts", "shm", "mqueue")
SYMLINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "core": "/proc/kcore",
    "ptmx": "pts/ptmx",
}


def _is_node(path: Path, rdev: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISCHR(st.st_mode)
        and st.st_rdev == rdev
        and stat.S_IMODE(st.st_mode) == 0o666
        and (st.st_uid, st.st_gid) == (0, 0)
    )


def make_devices(directory: Path, root_uid: int) -> Path:
    """The sandbox's /dev in ``directory``: a tmpfs mounted there (owned by ``root_uid``, the sandbox's root
    on the host) unless one is, with the device nodes made (again, when one is not what it should be), the
    mount points and symlinks. Idempotent; returns ``directory``. Runs as host root, before the sandbox
    starts."""
    directory.mkdir(mode=0o755, exist_ok=True)
    if not os.path.ismount(directory):
        syscalls.mount("tmpfs", str(directory), "tmpfs", MS_NOSUID | MS_STRICTATIME, f"mode=0755,size={SIZE}")
    os.chown(directory, root_uid, root_uid)  # not a mount option: those the sandbox reads in its mount table
    for name, (major, minor) in DEVICE_NUMBERS.items():
        path, rdev = directory / name, os.makedev(major, minor)
        if _is_node(path, rdev):
            continue
        staging = directory / f".{name}.new"
        staging.unlink(missing_ok=True)
        os.mknod(staging, stat.S_IFCHR | 0o666, rdev)
        os.chown(staging, 0, 0, follow_symlinks=False)
        os.chmod(staging, 0o666)  # noqa: S103 (device nodes every program may use, as on the host)
        staging.rename(path)
    for name in MOUNT_POINTS:
        point = directory / name
        if not point.is_dir() or point.is_symlink():
            point.unlink(missing_ok=True)
            point.mkdir(mode=0o755)
            os.chown(point, root_uid, root_uid, follow_symlinks=False)
    for name, target in SYMLINKS.items():
        link = directory / name
        if not link.is_symlink():
            link.unlink(missing_ok=True)
            link.symlink_to(target)
            os.chown(link, root_uid, root_uid, follow_symlinks=False)
    return directory
