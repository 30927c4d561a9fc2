"""The few Linux system calls Python's standard library lacks (mount, umount2, openat2, fstatfs, prctl), through
ctypes."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

MNT_DETACH = 2
SYS_OPENAT2 = 437  # x86_64
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
OPENAT2_ATTEMPTS = 32  # EAGAIN (a rename or mount race seen by the path walk) is retried this many times


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    _check(
        _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()),
        f"mount {target}",
    )


def umount(target: str, *, lazy: bool = False) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH if lazy else 0), f"umount {target}")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = RESOLVE_IN_ROOT) -> int:
    """``openat2(2)``: with RESOLVE_IN_ROOT, ``..``, absolute paths and symlinks resolve as if ``dirfd`` were
    the root, so a path can never leave it."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve | RESOLVE_NO_MAGICLINKS)
    name = ctypes.c_char_p(os.fsencode(path))  # names that are not UTF-8 arrive as surrogate escapes
    err = errno.EAGAIN
    for _attempt in range(OPENAT2_ATTEMPTS):
        fd = _libc.syscall(SYS_OPENAT2, ctypes.c_int(dirfd), name, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            break
        # the kernel saw a rename or a mount somewhere on the host while it resolved ".." (openat2(2),
        # EAGAIN): nothing is wrong with the path, the walk is simply done again
    raise OSError(err, os.strerror(err), path)


_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsgid.argtypes = [ctypes.c_uint]
SYS_CAPGET = 125
SYS_CAPSET = 126
_CAP_V3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _raise_effective_caps() -> None:
    """Make this thread's effective capabilities its permitted ones again (setfsuid to non-zero drops the
    file-system ones from the effective set)."""
    header = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    if _libc.syscall(SYS_CAPGET, ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for d in data:
        d.effective = d.permitted
    if _libc.syscall(SYS_CAPSET, ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


@contextlib.contextmanager
def file_identity(uid: int, gid: int) -> Iterator[None]:
    """Within the block, files this thread creates belong to ``uid``:``gid`` (its fsuid/fsgid), keeping the
    thread's capabilities. Needed to create files on a filesystem mounted inside a sandbox's user namespace
    (a tmpfs there refuses owners it cannot map: EOVERFLOW). Per thread: other threads are unaffected."""
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    try:
        _raise_effective_caps()
        yield
    finally:
        _libc.setfsuid(0)
        _libc.setfsgid(0)


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_StatFs)]


def fs_type(fd: int) -> int:
    """``f_type`` of the filesystem ``fd`` is on (fstatfs(2)): which kind of filesystem holds it."""
    buf = _StatFs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(buf.f_type) & 0xFFFFFFFF


PR_SET_PDEATHSIG = 1
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def set_parent_death_signal(sig: int) -> None:
    """``sig`` to this process when its parent ends (prctl PR_SET_PDEATHSIG; cleared by credential changes, so
    set it after them)."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl PR_SET_PDEATHSIG")
