"""Files inside a sandbox, reached through its root (``/proc/<init>/root``) with openat2's RESOLVE_IN_ROOT:
``..``, absolute symlinks and links pointing out all resolve inside the sandbox's root (and its own mounts),
never on the host. New files and directories belong to the sandbox's root user.

For a tenant (files API, SFTP, ``user`` lookups) these primitives run in a file worker (``fileworker``): a
process that entered the sandbox's user namespace as its root (``confined=True``), so the kernel grants what
the sandbox's root could do and nothing more. On top of that, reads, writes and attribute changes are refused
on pseudo-filesystems (anything but ``SANDBOX_FILESYSTEMS``) and on anything but regular files (directories
and symbolic links too for attributes). The node itself uses them directly only on a root it is preparing."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import heapq
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from corral.runtime.syscalls import file_identity, fs_type, openat2

CHUNK = 256 * 1024
ID_COUNT = 65536  # ids a sandbox's user namespace maps: 0..65535 inside, offset by its root's host id
NOBODY = 65534  # how an id the sandbox does not map shows inside (the kernel's overflow id)
UMASK = 0o022  # new files and directories made by the primitives below: the mode asked for, less this
BTRFS, OVERLAY, TMPFS = 0x9123683E, 0x794C7630, 0x01021994  # statfs f_type
# Where a sandbox keeps files of its own: its disk (btrfs), its root (overlay), /dev/shm and /dev (tmpfs).
# Everything else (proc, sysfs, devpts, cgroup, mqueue, ...) is the kernel's, read by nobody on its behalf.
SANDBOX_FILESYSTEMS = frozenset({BTRFS, OVERLAY, TMPFS})


class FileError(Exception):
    """A file operation failed for a reason the user can fix; ``kind`` picks the API error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # not_found | not_a_directory | is_a_directory | exists | disk_full | invalid
        # | not_running | busy (transient: try again) | refused (a pseudo-filesystem or a device) | denied


@dataclass(frozen=True)
class Entry:
    name: str
    type: str  # file | directory | symlink | other
    size: int
    mode: str  # octal permission bits, e.g. "0644"
    mtime: datetime


def normalise(path: str) -> str:
    """A sandbox path: absolute, no NUL; relative paths are taken from ``/``."""
    if not path or "\x00" in path or len(path) > 4096:
        raise FileError("invalid", "path must be a non-empty path without NUL, at most 4096 characters")
    return "/" + path.lstrip("/")


def _translate(exc: OSError, path: str) -> FileError:
    kinds = {
        errno.ENOENT: ("not_found", f"{path} does not exist"),
        errno.ENOTDIR: ("not_a_directory", f"a parent of {path} is not a directory"),
        errno.EISDIR: ("is_a_directory", f"{path} is a directory"),
        errno.EEXIST: ("exists", f"{path} already exists"),
        errno.EDQUOT: ("disk_full", "the sandbox's disk is full (disk_mib reached)"),
        errno.ENOSPC: ("disk_full", "the sandbox's disk is full"),
        errno.ELOOP: ("invalid", f"too many symbolic links resolving {path}"),
        errno.ENAMETOOLONG: ("invalid", f"{path} is too long"),
        errno.EXDEV: ("invalid", f"{path} cannot be reached"),
        errno.EOVERFLOW: ("invalid", f"{path}: the owner cannot be represented on that filesystem"),
        errno.EAGAIN: ("busy", f"{path}: the sandbox's filesystem was changing; try again"),
        errno.EACCES: ("denied", f"{path}: permission denied"),
        errno.EPERM: ("denied", f"{path}: operation not permitted"),
    }
    kind, message = kinds.get(exc.errno or 0, ("invalid", f"{path}: {exc.strerror}"))
    return FileError(kind, message)


@dataclass(frozen=True)
class AttrChange:
    """Attributes to change (``None`` leaves one as it is); ``uid``/``gid`` as seen inside the sandbox."""

    size: int | None = None
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


translate = _translate  # for callers that get an OSError for a path: the FileError to report


def refuse_mount_point(dir_fd: int, name: str, path: str) -> None:
    """EBUSY when the entry ``name`` of the directory ``dir_fd`` is a mount point (on another mount than the
    directory, like the device nodes bound into ``/dev``), as the sandbox itself would get: a worker lives in
    the host's mount namespace, where the sandbox's mount points are plain names and could be replaced."""
    try:
        entry = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    try:
        if mount_id(entry) != mount_id(dir_fd):
            raise OSError(errno.EBUSY, "a mount point cannot be replaced, moved or removed", path)
    finally:
        os.close(entry)


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` was opened on (``mnt_id`` of /proc/self/fdinfo: exact, unlike ``st_dev``,
    which overlayfs gives per underlying layer)."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
        for line in info:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.EINVAL, "no mount id for an fd")


def check_own_filesystem(fd: int, path: str, allowed: frozenset[int] = SANDBOX_FILESYSTEMS) -> None:
    """Refuse (EPERM) an fd on a filesystem that is not the sandbox's own (``/proc``, ``/sys``, ...)."""
    if fs_type(fd) not in allowed:
        raise OSError(errno.EPERM, "not a file of the sandbox's own filesystems (a kernel filesystem)", path)


def _proc_fd(fd: int) -> str:
    """The path of our own ``fd``: operating through it reaches exactly the inode the fd holds (how an
    O_PATH fd found in the sandbox's root is changed without resolving anything on the host)."""
    return f"/proc/self/fd/{fd}"


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rstrip("/").rpartition("/")
    return parent or "/", name


@dataclass(frozen=True)
class SandboxFiles:
    """File access to the sandbox whose init has host PID ``pid`` (or, before it runs, to its root
    filesystem mounted at ``root_dir``); new files are owned by ``uid``:``gid``."""

    pid: int
    uid: int
    gid: int
    root_dir: str | None = None
    confined: bool = False  # True in a file worker: the process already has the sandbox root's credentials
    filesystems: frozenset[int] = SANDBOX_FILESYSTEMS  # where reads, writes and attribute changes are allowed
    cid: str = ""  # the sandbox's container id: its file workers are ended with it (``end_file_access``)
    cgroups: tuple[str, ...] = ()  # the sandbox's cgroup directories: its file workers join them

    @classmethod
    def at(cls, root_dir: str, uid: int, gid: int) -> SandboxFiles:
        return cls(0, uid, gid, root_dir)

    def pinned(self) -> tuple[SandboxFiles, int]:
        """The same files with the sandbox's root held open now (the fd, for the caller to close when done):
        a long session keeps reaching this root, never whatever process later gets the same PID."""
        fd = self._root()
        return dataclasses.replace(self, root_dir=f"/proc/self/fd/{fd}"), fd

    def _owner(self) -> contextlib.AbstractContextManager[None]:
        """New names made in the block belong to the sandbox's root (already so in a worker)."""
        return contextlib.nullcontext() if self.confined else file_identity(self.uid, self.gid)

    def worker_fds(self) -> tuple[int, int]:
        """(user namespace, root) fds of the running sandbox, for a file worker; both opened through one
        ``/proc/<pid>`` directory fd, so they belong to one process. A pinned root (``pinned``) must be that
        process's root, or the PID was reused: ``not_running``. The caller closes both."""
        if not self.pid:
            raise FileError("not_running", "the sandbox is not running")
        try:
            proc = os.open(f"/proc/{self.pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise FileError("not_running", "the sandbox is not running") from exc
        opened: list[int] = []
        try:
            opened.append(os.open("ns/user", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc))
            opened.append(os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc))
            if self.root_dir is not None:
                pinned = os.stat(self.root_dir)
                now = os.fstat(opened[1])
                if (pinned.st_dev, pinned.st_ino) != (now.st_dev, now.st_ino):
                    raise FileError("not_running", "the sandbox is not running")
        except OSError as exc:
            for fd in opened:
                os.close(fd)
            raise FileError("not_running", "the sandbox is not running") from exc
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        finally:
            os.close(proc)
        return opened[0], opened[1]

    def _root(self) -> int:
        try:
            return os.open(
                self.root_dir or f"/proc/{self.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
            )
        except OSError as exc:
            raise FileError("not_running", "the sandbox is not running") from exc

    def _open(self, path: str, flags: int, mode: int = 0) -> int:
        root = self._root()
        try:
            return openat2(root, path, flags, mode)
        except OSError as exc:
            raise _translate(exc, path) from None
        finally:
            os.close(root)

    def _mkdirs(self, path: str) -> None:
        """Create every missing directory of ``path`` (like ``mkdir -p``), each confined to the root."""
        parts = [p for p in path.split("/") if p]
        current = ""
        for part in parts:
            current += "/" + part
            parent, name = _split(current)
            dfd = self._open(parent, os.O_PATH | os.O_DIRECTORY)
            try:
                with self._owner():
                    os.mkdir(name, 0o755, dir_fd=dfd)
            except FileExistsError:
                pass
            except OSError as exc:
                raise _translate(exc, current) from None
            finally:
                os.close(dfd)

    def begin_write(self, path: str, *, mode: int = 0o644, parents: bool = False) -> Upload:
        """Start writing the file ``path`` (replacing it when committed): data goes to a temporary name in
        the same directory first, so an upload that fails or is abandoned leaves no partial file."""
        path = normalise(path)
        parent, name = _split(path)
        if not name or name in (".", "..") or path.endswith("/"):
            raise FileError("invalid", f"{path} names a directory, not a file")
        if parents:
            self._mkdirs(parent)
        dfd = self._open(parent, os.O_PATH | os.O_DIRECTORY)
        try:
            try:
                check_own_filesystem(dfd, parent, self.filesystems)
                refuse_mount_point(dfd, name, path)
                existing = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISDIR(existing.st_mode):
                    raise FileError("is_a_directory", f"{path} is a directory")
                if not (stat.S_ISREG(existing.st_mode) or stat.S_ISLNK(existing.st_mode)):
                    raise FileError("refused", f"{path} is not a regular file")
            except FileNotFoundError:
                pass
            tmp = f".corral-upload-{secrets.token_hex(8)}"  # short: the target's name may be 255 bytes
            with self._owner():  # owned by the sandbox's root from the start
                fd = os.open(
                    tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=dfd,
                )
        except OSError as exc:
            os.close(dfd)
            raise _translate(exc, path) from None
        except BaseException:
            os.close(dfd)
            raise
        return Upload(self, path, dfd, tmp, name, fd, mode)

    def write(self, path: str, chunks: Iterable[bytes], *, mode: int = 0o644, parents: bool = False) -> int:
        """Write a file from ``chunks`` (replacing it); return the bytes written. A failed write leaves no
        partial file under ``path``."""
        upload = self.begin_write(path, mode=mode, parents=parents)
        try:
            for chunk in chunks:
                upload.write(chunk)
            return upload.commit()
        finally:
            upload.abort()

    def read(self, path: str) -> tuple[int, Iterator[bytes]]:
        """(size, chunks) of a regular file; the file is opened now, so errors surface before streaming.
        At most ``size`` bytes are produced (a file growing meanwhile is cut at its size when opened); a size
        of 0 means unknown: everything is read."""
        path = normalise(path)
        fd = self.open_read(path)
        size = os.fstat(fd).st_size

        def chunks() -> Iterator[bytes]:
            left = size or -1
            try:
                while left != 0 and (data := os.read(fd, CHUNK if left < 0 else min(CHUNK, left))):
                    if left > 0:
                        left -= len(data)
                    yield data
            finally:
                os.close(fd)

        return size, chunks()

    def open_read(self, path: str) -> int:
        """An fd of the regular file ``path`` of the sandbox's own filesystems, open for reading."""
        fd = self._open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "is_a_directory" if stat.S_ISDIR(st.st_mode) else "refused"
                raise FileError(kind, f"{path} is not a regular file")
            try:
                check_own_filesystem(fd, path, self.filesystems)
            except OSError:
                raise FileError("refused", f"{path} is a kernel file, not one of the sandbox's") from None
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def list(self, path: str) -> list[Entry]:
        """Every entry of the directory ``path``, by name (for the node's own use: tenants page)."""
        entries, _following = self.list_page(path, None, 1 << 62)
        return entries

    def list_page(
        self, path: str, after: bytes | None, limit: int
    ) -> tuple[builtins.list[Entry], bytes | None]:
        """Up to ``limit`` entries of the directory ``path`` whose names sort (as bytes) after ``after``, by
        name, and the name to continue after when more follow (None: the last page). The directory is
        scanned once, holding at most ``limit + 1`` names: a directory of any size costs a page's memory."""
        path = normalise(path)
        fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(fd) as scan:
                names = (os.fsencode(e.name) for e in scan)
                wanted = heapq.nsmallest(limit + 1, (n for n in names if after is None or n > after))
            entries: list[Entry] = []
            for raw in wanted[:limit]:
                name = os.fsdecode(raw)
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue
                entries.append(
                    Entry(
                        name=name,
                        type=_kind(st.st_mode),
                        size=st.st_size,
                        mode=f"{stat.S_IMODE(st.st_mode):04o}",
                        mtime=datetime.fromtimestamp(st.st_mtime, UTC),
                    )
                )
        except OSError as exc:
            raise _translate(exc, path) from None
        finally:
            os.close(fd)
        return entries, wanted[limit - 1] if len(wanted) > limit else None

    def read_small(self, path: str, limit: int = 1 << 20) -> bytes:
        _size, chunks = self.read(path)
        data = b""
        for chunk in chunks:
            data += chunk
            if len(data) > limit:
                break
        return data[:limit]

    # ---- confined primitives for protocol servers (SFTP) -------------------------------------------------
    # Paths are absolute sandbox paths, resolved in the root by openat2 like the rest; an operation on a
    # last component that must not be followed resolves the PARENT and acts on the name with ``dir_fd``
    # (never on ``.`` or ``..``: those would step out of the directory fd unconfined). Failures are OSError
    # with the errno, for the caller to map (FileError ``not_running`` when the sandbox is gone). Changes are
    # made with the sandbox root's identity (``file_identity``, in the calling thread): new names are its.

    # ---- ids -------------------------------------------------------------------------------------------

    def inside_uid(self, host: int) -> int:
        return host - self.uid if 0 <= host - self.uid < ID_COUNT else NOBODY

    def inside_gid(self, host: int) -> int:
        return host - self.gid if 0 <= host - self.gid < ID_COUNT else NOBODY

    def host_ids(self, uid: int | None, gid: int | None) -> tuple[int, int]:
        """Host ids for ids inside the sandbox (-1: unchanged); EINVAL outside 0..65535."""
        for inside in (uid, gid):
            if inside is not None and not 0 <= inside < ID_COUNT:
                raise OSError(errno.EINVAL, f"ids inside a sandbox are 0-{ID_COUNT - 1}, not {inside}")
        return (-1 if uid is None else self.uid + uid, -1 if gid is None else self.gid + gid)

    # ---- resolution ------------------------------------------------------------------------------------

    def open_fd(self, path: str, flags: int, mode: int = 0) -> int:
        root = self._root()
        try:
            return openat2(root, path, flags, mode)
        finally:
            os.close(root)

    @contextlib.contextmanager
    def parent(self, path: str) -> Iterator[tuple[int, str]]:
        """(O_PATH fd of the directory holding ``path``'s last component, that name)."""
        parent, name = _split(path)
        if name in ("", ".", ".."):
            raise OSError(errno.EINVAL, "the path names no entry of a directory", path)
        dfd = self.open_fd(parent, os.O_PATH | os.O_DIRECTORY)
        try:
            yield dfd, name
        finally:
            os.close(dfd)

    def stat(self, path: str, *, follow: bool = True) -> os.stat_result:
        fd = self.open_fd(path, os.O_PATH | (0 if follow else os.O_NOFOLLOW))
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def statvfs(self, path: str) -> os.statvfs_result:
        fd = self.open_fd(path, os.O_PATH)
        try:
            return os.statvfs(fd)
        finally:
            os.close(fd)

    # ---- files -----------------------------------------------------------------------------------------

    def _reopen(self, path: str, flags: int) -> int:
        """Open the existing regular file ``path``: found with O_PATH, checked, then reopened through our
        own fd, so a FIFO or device node in the sandbox is never opened from the host."""
        pfd = self.open_fd(path, os.O_PATH)
        try:
            mode = os.fstat(pfd).st_mode
            if not stat.S_ISREG(mode):
                raise OSError(
                    errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL, "not a regular file", path
                )
            check_own_filesystem(pfd, path, self.filesystems)
            return os.open(_proc_fd(pfd), flags | os.O_NOCTTY | os.O_CLOEXEC)
        finally:
            os.close(pfd)

    def open_file(self, path: str, flags: int, mode: int = 0o666) -> int:
        """An fd of the regular file ``path`` opened with ``flags`` (O_RDONLY/O_WRONLY/O_RDWR with O_APPEND,
        O_CREAT, O_EXCL, O_TRUNC as in open(2)); a file it creates belongs to the sandbox's root and has
        ``mode`` less UMASK. Anything but a regular file is refused (EISDIR, EINVAL)."""
        create, exclusive = flags & os.O_CREAT, flags & os.O_EXCL
        base = flags & ~(os.O_CREAT | os.O_EXCL)
        for _attempt in range(3):  # exists / does not exist may change in between: try again
            if not exclusive:
                try:
                    return self._reopen(path, base)
                except FileNotFoundError:
                    if not create:
                        raise
            try:
                with self._owner():
                    fd = self.open_fd(path, base | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                if exclusive:
                    raise
                continue  # made meanwhile, or a dangling symbolic link (handled below)
            try:
                os.fchmod(fd, mode & 0o7777 & ~UMASK)
            except BaseException:
                os.close(fd)
                raise
            return fd
        # a dangling symbolic link: create its target, resolved in the root like everything else
        with self._owner():
            fd = self.open_fd(path, base | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY, mode & 0o7777 & ~UMASK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        return fd

    def set_attrs(self, path: str, change: AttrChange, *, follow: bool = True) -> None:
        fd = self.open_fd(path, os.O_PATH | (0 if follow else os.O_NOFOLLOW))
        try:
            self.set_fd_attrs(fd, change)
        finally:
            os.close(fd)

    def set_fd_attrs(self, fd: int, change: AttrChange) -> None:
        """Change what ``change`` names on the inode ``fd`` holds (size, owner, then mode: a chown clears
        set-id bits, then times)."""
        target = _proc_fd(fd)
        kind = os.fstat(fd).st_mode
        if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind) or stat.S_ISLNK(kind)):
            raise OSError(errno.EPERM, "attributes change only on files, directories and links")
        check_own_filesystem(fd, target, self.filesystems)
        with self._owner():
            if change.size is not None:
                os.truncate(target, change.size)
            if change.uid is not None or change.gid is not None:
                os.chown(target, *self.host_ids(change.uid, change.gid))
            if change.mode is not None:
                os.chmod(target, change.mode & 0o7777)
            if change.atime_ns is not None or change.mtime_ns is not None:
                now = os.fstat(fd)
                atime = now.st_atime_ns if change.atime_ns is None else change.atime_ns
                mtime = now.st_mtime_ns if change.mtime_ns is None else change.mtime_ns
                os.utime(target, ns=(atime, mtime))

    # ---- names -----------------------------------------------------------------------------------------

    def dir_start(self, dir_fd: int, path: str) -> builtins.list[tuple[str, os.stat_result]]:
        """``.`` and ``..`` of the directory open at ``dir_fd`` (its ``path`` finds ``..``)."""
        found = [(".", os.fstat(dir_fd))]
        with contextlib.suppress(OSError):
            found.append(("..", self.stat(path.rstrip("/") + "/..")))
        return found

    @staticmethod
    def dir_next(
        dir_fd: int, scan: Iterator[os.DirEntry[str]], count: int
    ) -> builtins.list[tuple[str, os.stat_result]]:
        """Up to ``count`` more entries (not followed) from ``scan`` of the directory open at ``dir_fd``;
        entries gone meanwhile are skipped; an empty list is the end."""
        found: builtins.list[tuple[str, os.stat_result]] = []
        for entry in scan:
            with contextlib.suppress(OSError):
                found.append((entry.name, os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)))
            if len(found) >= count:
                break
        return found

    def entries(self, dir_fd: int, path: str) -> tuple[tuple[str, os.stat_result], ...]:
        """``.``, ``..`` and every entry (not followed) of the directory open at ``dir_fd`` (its ``path``
        finds ``..``), by name; entries gone meanwhile are skipped."""
        found = [(".", os.fstat(dir_fd))]
        with contextlib.suppress(OSError):
            found.append(("..", self.stat(path.rstrip("/") + "/..")))
        for name in sorted(os.listdir(dir_fd)):
            with contextlib.suppress(OSError):
                found.append((name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False)))
        return tuple(found)

    def mkdir(self, path: str, mode: int = 0o777) -> None:
        with self.parent(path) as (dfd, name), self._owner():
            os.mkdir(name, 0o700, dir_fd=dfd)
            fd = openat2(dfd, name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.chmod(_proc_fd(fd), mode & 0o7777 & ~UMASK)
            finally:
                os.close(fd)

    def rmdir(self, path: str) -> None:
        with self.parent(path) as (dfd, name), self._owner():
            refuse_mount_point(dfd, name, path)
            os.rmdir(name, dir_fd=dfd)

    def unlink(self, path: str) -> None:
        with self.parent(path) as (dfd, name), self._owner():
            refuse_mount_point(dfd, name, path)
            os.unlink(name, dir_fd=dfd)

    def rename(self, old: str, new: str, *, replace: bool) -> None:
        """Rename ``old`` to ``new``; without ``replace`` an existing ``new`` is EEXIST (a hard link then
        unlink makes that atomic for everything but directories, as OpenSSH's sftp-server does)."""
        with (
            self.parent(old) as (odfd, oname),
            self.parent(new) as (ndfd, nname),
            self._owner(),
        ):
            refuse_mount_point(odfd, oname, old)
            refuse_mount_point(ndfd, nname, new)
            if not replace:
                try:
                    os.link(oname, nname, src_dir_fd=odfd, dst_dir_fd=ndfd, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                        raise
                    try:  # a directory, or no hard links there: check, then rename
                        os.stat(nname, dir_fd=ndfd, follow_symlinks=False)
                    except FileNotFoundError:
                        pass
                    else:
                        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), new) from None
                else:
                    os.unlink(oname, dir_fd=odfd)
                    return
            os.rename(oname, nname, src_dir_fd=odfd, dst_dir_fd=ndfd)

    def symlink(self, target: bytes, path: str) -> None:
        """A symbolic link at ``path`` holding ``target`` verbatim (it is resolved by whoever follows it:
        in the sandbox, or in its root by these primitives)."""
        with self.parent(path) as (dfd, name), self._owner():
            os.symlink(target, os.fsencode(name), dir_fd=dfd)

    def link(self, old: str, new: str) -> None:
        """A hard link ``new`` to ``old`` itself (a symbolic link is not followed)."""
        with (
            self.parent(old) as (odfd, oname),
            self.parent(new) as (ndfd, nname),
            self._owner(),
        ):
            os.link(oname, nname, src_dir_fd=odfd, dst_dir_fd=ndfd, follow_symlinks=False)

    def readlink(self, path: str) -> bytes:
        with self.parent(path) as (dfd, name):
            return os.readlink(os.fsencode(name), dir_fd=dfd)


class Upload:
    """A file being written under a temporary name (``SandboxFiles.begin_write``): ``write`` the data, then
    ``commit`` renames it into place; ``abort`` (also after a commit: then nothing is left to do) removes it."""

    def __init__(
        self, files: SandboxFiles, path: str, dfd: int, tmp: str, name: str, fd: int, mode: int
    ) -> None:
        self.files = files
        self.path = path
        self._dfd = dfd
        self._tmp = tmp
        self._name = name
        self._fd = fd
        self._mode = mode
        self.written = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                done = os.write(self._fd, view)
                view = view[done:]
                self.written += done
        except OSError as exc:
            raise _translate(exc, self.path) from None

    def commit(self) -> int:
        try:
            os.fchmod(self._fd, self._mode & 0o7777)
            os.close(self._fd)
            self._fd = -1
            with self.files._owner():  # a name made on a tmpfs of the sandbox's, too
                os.rename(self._tmp, self._name, src_dir_fd=self._dfd, dst_dir_fd=self._dfd)
            self._tmp = ""
        except OSError as exc:
            raise _translate(exc, self.path) from None
        return self.written

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp:
            with contextlib.suppress(OSError), self.files._owner():
                os.unlink(self._tmp, dir_fd=self._dfd)
            self._tmp = ""
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


_NUMERIC_USER = re.compile(r"([0-9]+)(?::([0-9]+))?")


def _lookup(files: SandboxFiles, table: str, name: str) -> list[str] | None:
    try:
        if files.pid and not files.confined:  # a running sandbox: read as its root reads (a file worker)
            from corral.node.fileclient import read_small, sync_session  # here: that module imports this one

            with sync_session(files) as session:
                data = read_small(session, table)
        else:
            data = files.read_small(table)
        text = data.decode(errors="replace")
    except (FileError, OSError):
        return None
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == name:
            return fields
    return None


def resolve_user(files: SandboxFiles, user: str) -> str:
    """``uid:gid`` for crun/runc from ``uid``, ``uid:gid``, ``name`` or ``name:group`` (names looked up in the
    sandbox's /etc/passwd and /etc/group, read by a file worker with the sandbox's credentials: blocking, for
    a thread)."""
    numeric = _NUMERIC_USER.fullmatch(user)
    if numeric:
        uid, gid = int(numeric[1]), numeric[2]
        if uid > 65535 or (gid is not None and int(gid) > 65535):
            raise FileError("invalid", "user ids inside a sandbox are 0-65535")
        return f"{uid}:{int(gid)}" if gid is not None else str(uid)
    head, sep, group = user.partition(":")
    if not head or (sep and not group):
        raise FileError("invalid", f"{user!r} is not a user: give a name, a uid or uid:gid")
    if head.isascii() and head.isdigit():
        uid_text = head
        passwd_gid = None
    else:
        entry = _lookup(files, "/etc/passwd", head)
        if entry is None:
            raise FileError("invalid", f"no user {head!r} in the sandbox")
        uid_text, passwd_gid = entry[2], entry[3]
    if not group:
        return f"{uid_text}:{passwd_gid}" if passwd_gid is not None else uid_text
    if group.isascii() and group.isdigit():
        return f"{uid_text}:{group}"
    gentry = _lookup(files, "/etc/group", group)
    if gentry is None:
        raise FileError("invalid", f"no group {group!r} in the sandbox")
    return f"{uid_text}:{gentry[2]}"
