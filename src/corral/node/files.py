"""Files inside a running sandbox, reached from the host through ``/proc/<init>/root`` with openat2's
RESOLVE_IN_ROOT: ``..``, absolute symlinks and links pointing out all resolve inside the sandbox's root (and
its own mounts), never on the host. New files and directories belong to the sandbox's root user."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from corral.runtime.syscalls import file_identity, openat2

CHUNK = 256 * 1024
ID_COUNT = 65536  # ids a sandbox's user namespace maps: 0..65535 inside, offset by its root's host id
NOBODY = 65534  # how an id the sandbox does not map shows inside (the kernel's overflow id)
UMASK = 0o022  # new files and directories made by the primitives below: the mode asked for, less this


class FileError(Exception):
    """A file operation failed for a reason the user can fix; ``kind`` picks the API error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # not_found | not_a_directory | is_a_directory | exists | disk_full | invalid


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

    @classmethod
    def at(cls, root_dir: str, uid: int, gid: int) -> SandboxFiles:
        return cls(0, uid, gid, root_dir)

    def pinned(self) -> tuple[SandboxFiles, int]:
        """The same files with the sandbox's root held open now (the fd, for the caller to close when done):
        a long session keeps reaching this root, never whatever process later gets the same PID."""
        fd = self._root()
        return dataclasses.replace(self, root_dir=f"/proc/self/fd/{fd}"), fd

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
                with file_identity(self.uid, self.gid):
                    os.mkdir(name, 0o755, dir_fd=dfd)
            except FileExistsError:
                pass
            except OSError as exc:
                raise _translate(exc, current) from None
            finally:
                os.close(dfd)

    def write(self, path: str, chunks: Iterable[bytes], *, mode: int = 0o644, parents: bool = False) -> int:
        """Write a file from ``chunks`` (replacing it); return the bytes written. A failed write leaves no
        partial file under ``path``: data goes to a temporary name first and is renamed into place."""
        path = normalise(path)
        parent, name = _split(path)
        if not name or name in (".", "..") or path.endswith("/"):
            raise FileError("invalid", f"{path} names a directory, not a file")
        if parents:
            self._mkdirs(parent)
        dfd = self._open(parent, os.O_PATH | os.O_DIRECTORY)
        tmp = f".corral-upload-{secrets.token_hex(8)}"  # short: the target's name may be 255 bytes already
        written = 0
        try:
            try:
                existing = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISDIR(existing.st_mode):
                    raise FileError("is_a_directory", f"{path} is a directory")
            except FileNotFoundError:
                pass
            try:
                with file_identity(self.uid, self.gid):  # owned by the sandbox's root from the start
                    fd = os.open(
                        tmp,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600,
                        dir_fd=dfd,
                    )
            except OSError as exc:
                raise _translate(exc, path) from None
            try:
                with os.fdopen(fd, "wb", closefd=True) as f:
                    for chunk in chunks:
                        f.write(chunk)
                        written += len(chunk)
                    f.flush()
                    os.fchmod(f.fileno(), mode & 0o7777)
                with file_identity(self.uid, self.gid):  # a name made on a tmpfs of the sandbox's, too
                    os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException as exc:
                with contextlib.suppress(OSError), file_identity(self.uid, self.gid):
                    os.unlink(tmp, dir_fd=dfd)
                if isinstance(exc, OSError):
                    raise _translate(exc, path) from None
                raise
        finally:
            os.close(dfd)
        return written

    def read(self, path: str) -> tuple[int, Iterator[bytes]]:
        """(size, chunks) of a regular file; the file is opened now, so errors surface before streaming.
        At most ``size`` bytes are produced (a file growing meanwhile is cut at its size when opened); a size
        of 0 means unknown (``/proc`` files): everything is read."""
        path = normalise(path)
        fd = self._open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            kind = "is_a_directory" if stat.S_ISDIR(st.st_mode) else "invalid"
            raise FileError(kind, f"{path} is not a regular file")
        os.set_blocking(fd, True)

        size = st.st_size

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

    def list(self, path: str) -> list[Entry]:
        path = normalise(path)
        fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        entries: list[Entry] = []
        try:
            for name in os.listdir(fd):
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
        finally:
            os.close(fd)
        return sorted(entries, key=lambda e: e.name)

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
                with file_identity(self.uid, self.gid):
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
        with file_identity(self.uid, self.gid):
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
        with file_identity(self.uid, self.gid):
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
        with self.parent(path) as (dfd, name), file_identity(self.uid, self.gid):
            os.mkdir(name, 0o700, dir_fd=dfd)
            fd = openat2(dfd, name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.chmod(_proc_fd(fd), mode & 0o7777 & ~UMASK)
            finally:
                os.close(fd)

    def rmdir(self, path: str) -> None:
        with self.parent(path) as (dfd, name), file_identity(self.uid, self.gid):
            os.rmdir(name, dir_fd=dfd)

    def unlink(self, path: str) -> None:
        with self.parent(path) as (dfd, name), file_identity(self.uid, self.gid):
            os.unlink(name, dir_fd=dfd)

    def rename(self, old: str, new: str, *, replace: bool) -> None:
        """Rename ``old`` to ``new``; without ``replace`` an existing ``new`` is EEXIST (a hard link then
        unlink makes that atomic for everything but directories, as OpenSSH's sftp-server does)."""
        with (
            self.parent(old) as (odfd, oname),
            self.parent(new) as (ndfd, nname),
            file_identity(self.uid, self.gid),
        ):
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
        with self.parent(path) as (dfd, name), file_identity(self.uid, self.gid):
            os.symlink(target, os.fsencode(name), dir_fd=dfd)

    def link(self, old: str, new: str) -> None:
        """A hard link ``new`` to ``old`` itself (a symbolic link is not followed)."""
        with (
            self.parent(old) as (odfd, oname),
            self.parent(new) as (ndfd, nname),
            file_identity(self.uid, self.gid),
        ):
            os.link(oname, nname, src_dir_fd=odfd, dst_dir_fd=ndfd, follow_symlinks=False)

    def readlink(self, path: str) -> bytes:
        with self.parent(path) as (dfd, name):
            return os.readlink(os.fsencode(name), dir_fd=dfd)


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
        text = files.read_small(table).decode(errors="replace")
    except FileError:
        return None
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == name:
            return fields
    return None


def resolve_user(files: SandboxFiles, user: str) -> str:
    """``uid:gid`` for crun/runc from ``uid``, ``uid:gid``, ``name`` or ``name:group`` (names looked up in the
    sandbox's /etc/passwd and /etc/group)."""
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
