"""The SFTP subsystem of the SSH gateway (``sftp``, and ``scp``, which speaks SFTP): a sandbox's files as its
root sees them. The gateway runs as host root, so no path here is ever a host path: every operation goes
through :class:`SandboxFiles`' confined primitives (openat2 with RESOLVE_IN_ROOT; the last component of a
path that must not be followed is acted on by name in its parent), new files belong to the sandbox's root,
and ids go in and out as seen inside the sandbox. Paths are relative to the session's home, ``/root``."""

from __future__ import annotations

import asyncio
import errno
import os
import posixpath
import stat
from collections.abc import AsyncIterator, Callable
from typing import ParamSpec, TypeVar

import asyncssh

from corral.node.files import AttrChange, FileError, SandboxFiles

HOME = "/root"
INLINE_IO = 64 * 1024  # reads and writes up to this size run on the event loop; larger ones in a thread
MAX_READ = 4 * 1024 * 1024  # a larger read request is answered short, as SFTP allows
_NS = 1_000_000_000

P = ParamSpec("P")
T = TypeVar("T")

_STATUS: dict[int, Callable[[str], asyncssh.SFTPError]] = {
    errno.ENOENT: asyncssh.SFTPNoSuchFile,
    errno.EACCES: asyncssh.SFTPPermissionDenied,
    errno.EPERM: asyncssh.SFTPPermissionDenied,
    errno.EEXIST: asyncssh.SFTPFileAlreadyExists,
    errno.ENOTEMPTY: asyncssh.SFTPDirNotEmpty,
    errno.ENOTDIR: asyncssh.SFTPNotADirectory,
    errno.EISDIR: asyncssh.SFTPFileIsADirectory,
    errno.ELOOP: asyncssh.SFTPLinkLoop,
    errno.ENAMETOOLONG: asyncssh.SFTPInvalidFilename,
    errno.EINVAL: asyncssh.SFTPInvalidParameter,
    errno.ENOSPC: asyncssh.SFTPNoSpaceOnFilesystem,
    errno.EDQUOT: asyncssh.SFTPQuotaExceeded,
    errno.EROFS: asyncssh.SFTPWriteProtect,
    errno.EOPNOTSUPP: asyncssh.SFTPOpUnsupported,
}


def status(exc: Exception, path: str) -> asyncssh.SFTPError:
    """The SFTP status for a failed operation on ``path`` (a v3 client sees the codes it knows, the rest as
    a failure with the message)."""
    if isinstance(exc, asyncssh.SFTPError):
        return exc
    if isinstance(exc, OSError):
        message = f"{path}: {exc.strerror or exc}"
        return _STATUS.get(exc.errno or 0, asyncssh.SFTPFailure)(message)
    if isinstance(exc, UnicodeError):
        return asyncssh.SFTPInvalidFilename(f"{path}: only UTF-8 names are supported")
    return asyncssh.SFTPFailure(str(exc))


def sandbox_path(path: bytes, home: str = HOME) -> str:
    """The absolute sandbox path a client's ``path`` names: relative to ``home``, empty and ``.``
    components dropped. ``..`` is kept: the confined resolution gives it its physical meaning."""
    if b"\x00" in path:
        raise asyncssh.SFTPInvalidFilename("a path cannot hold NUL")
    full = posixpath.join(home, os.fsdecode(path))
    return "/" + "/".join(part for part in full.split("/") if part not in ("", "."))


def lexical_realpath(path: bytes, home: str = HOME) -> bytes:
    """``realpath`` without touching the filesystem: ``.`` is the home, ``..`` goes up (never above ``/``)."""
    normal = posixpath.normpath(sandbox_path(path, home))
    return os.fsencode("/" + normal.lstrip("/"))


def open_flags(pflags: int) -> int:
    """open(2) flags for SFTP v3 ``pflags``."""
    if pflags & asyncssh.FXF_READ and pflags & asyncssh.FXF_WRITE:
        flags = os.O_RDWR
    elif pflags & (asyncssh.FXF_WRITE | asyncssh.FXF_APPEND):
        flags = os.O_WRONLY
    else:
        flags = os.O_RDONLY
    for bit, flag in (
        (asyncssh.FXF_APPEND, os.O_APPEND),
        (asyncssh.FXF_CREAT, os.O_CREAT),
        (asyncssh.FXF_TRUNC, os.O_TRUNC),
        (asyncssh.FXF_EXCL, os.O_EXCL),
    ):
        if pflags & bit:
            flags |= flag
    return flags


def v3_pflags(desired_access: int, flags: int) -> int:
    """SFTP v3 pflags for a v5/v6 open's desired access and flags."""
    pflags = 0
    if desired_access & asyncssh.ACE4_READ_DATA:
        pflags |= asyncssh.FXF_READ
    if desired_access & (asyncssh.ACE4_WRITE_DATA | asyncssh.ACE4_APPEND_DATA):
        pflags |= asyncssh.FXF_WRITE
    if desired_access & asyncssh.ACE4_APPEND_DATA or flags & asyncssh.FXF_APPEND_DATA:
        pflags |= asyncssh.FXF_APPEND
    pflags |= {
        asyncssh.FXF_CREATE_NEW: asyncssh.FXF_CREAT | asyncssh.FXF_EXCL,
        asyncssh.FXF_CREATE_TRUNCATE: asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC,
        asyncssh.FXF_OPEN_OR_CREATE: asyncssh.FXF_CREAT,
        asyncssh.FXF_TRUNCATE_EXISTING: asyncssh.FXF_TRUNC,
    }.get(flags & asyncssh.FXF_ACCESS_DISPOSITION, 0)
    return pflags


def attr_change(attrs: asyncssh.SFTPAttrs) -> AttrChange:
    """What a setstat asks for (ids as seen inside the sandbox; owner names are not supported)."""
    if (attrs.owner is not None and attrs.uid is None) or (attrs.group is not None and attrs.gid is None):
        raise asyncssh.SFTPOwnerInvalid("give numeric ids")

    def ns(seconds: int | None, nanos: int | None) -> int | None:
        return None if seconds is None else seconds * _NS + (nanos or 0)

    return AttrChange(
        size=attrs.size,
        uid=attrs.uid,
        gid=attrs.gid,
        mode=None if attrs.permissions is None else stat.S_IMODE(attrs.permissions),
        atime_ns=ns(attrs.atime, attrs.atime_ns),
        mtime_ns=ns(attrs.mtime, attrs.mtime_ns),
    )


def id_names(text: str) -> dict[int, str]:
    """id -> name from an /etc/passwd or /etc/group text (the first name of an id wins)."""
    names: dict[int, str] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isascii() and fields[2].isdigit():
            names.setdefault(int(fields[2]), fields[0])
    return names


class _File:
    """An open file of the sandbox (``fileno``/``seek`` for asyncssh's sparse-range extension)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def fileno(self) -> int:
        return self.fd

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self.fd, offset, whence)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class _Listing:
    """A directory listing: the directory is opened at once (so OPENDIR reports a missing one), read on the
    first READDIR in a thread; the fd is closed once read, or when the handle is dropped unread."""

    def __init__(self, server: SandboxSFTP, fd: int, path: str) -> None:
        self._server = server
        self._fd = fd
        self._path = path
        self._names: list[asyncssh.SFTPName] | None = None

    def __aiter__(self) -> _Listing:
        return self

    async def __anext__(self) -> asyncssh.SFTPName:
        if self._names is None:
            try:
                entries = await self._server.run(self._path, self._server.files.entries, self._fd, self._path)
            finally:
                self._close()
            self._names = [
                asyncssh.SFTPName(os.fsencode(name), attrs=self._server.attrs(st)) for name, st in entries
            ]
            self._names.reverse()
        if not self._names:
            raise StopAsyncIteration
        return self._names.pop()

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:
        self._close()


class SandboxSFTP(asyncssh.SFTPServer):
    """An SFTP session as the root of the sandbox ``files`` reaches, confined to its root."""

    def __init__(
        self,
        chan: asyncssh.SSHServerChannel[bytes],
        files: SandboxFiles,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(chan)
        self.files = files
        self._on_exit = on_exit
        self._names: dict[str, dict[int, str]] = {}

    # ---- plumbing ------------------------------------------------------------------------------------------

    async def run(self, path: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn`` in a thread (file_identity is per thread: it is taken there), failures as SFTP statuses."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (OSError, FileError, UnicodeError) as exc:
            raise status(exc, path) from None

    def now(self, path: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn`` on the event loop (one quick system call), failures as SFTP statuses."""
        try:
            return fn(*args, **kwargs)
        except (OSError, FileError, UnicodeError) as exc:
            raise status(exc, path) from None

    def _id_name(self, table: str, ident: int | None) -> str:
        if ident is None:
            return ""
        if table not in self._names:
            try:
                self._names[table] = id_names(
                    self.files.read_small(table, 256 * 1024).decode(errors="replace")
                )
            except (FileError, OSError):
                self._names[table] = {}
        return self._names[table].get(ident, str(ident))

    def format_user(self, uid: int | None) -> str:
        return self._id_name("/etc/passwd", uid)

    def format_group(self, gid: int | None) -> str:
        return self._id_name("/etc/group", gid)

    def attrs(self, st: os.stat_result) -> asyncssh.SFTPAttrs:
        """SFTP attributes of ``st``, with the ids (and names) as seen inside the sandbox."""
        attrs = asyncssh.SFTPAttrs.from_local(st)
        attrs.uid = self.files.inside_uid(st.st_uid)
        attrs.gid = self.files.inside_gid(st.st_gid)
        attrs.owner = self.format_user(attrs.uid)
        attrs.group = self.format_group(attrs.gid)
        attrs.nlink = st.st_nlink
        return attrs

    # ---- files ---------------------------------------------------------------------------------------------

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        where = sandbox_path(path)
        mode = 0o666 if attrs.permissions is None else stat.S_IMODE(attrs.permissions)
        fd = await self.run(where, self.files.open_file, where, open_flags(pflags), mode)
        return _File(fd, where)

    async def open56(self, path: bytes, desired_access: int, flags: int, attrs: asyncssh.SFTPAttrs) -> object:
        return await self.open(path, v3_pflags(desired_access, flags), attrs)

    def close(self, file_obj: object) -> None:
        assert isinstance(file_obj, _File)
        file_obj.close()

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        assert isinstance(file_obj, _File)
        size = min(size, MAX_READ)
        if size <= INLINE_IO:
            return self.now(file_obj.path, os.pread, file_obj.fd, size, offset)
        return await self.run(file_obj.path, os.pread, file_obj.fd, size, offset)

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        assert isinstance(file_obj, _File)
        if len(data) <= INLINE_IO:
            return self.now(file_obj.path, _pwrite_all, file_obj.fd, data, offset)
        return await self.run(file_obj.path, _pwrite_all, file_obj.fd, data, offset)

    def fstat(self, file_obj: object) -> asyncssh.SFTPAttrs:
        assert isinstance(file_obj, _File)
        return self.attrs(self.now(file_obj.path, os.fstat, file_obj.fd))

    async def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        assert isinstance(file_obj, _File)
        await self.run(file_obj.path, self.files.set_fd_attrs, file_obj.fd, attr_change(attrs))

    async def fsync(self, file_obj: object) -> None:
        assert isinstance(file_obj, _File)
        await self.run(file_obj.path, os.fsync, file_obj.fd)

    def fstatvfs(self, file_obj: object) -> asyncssh.SFTPVFSAttrs:
        assert isinstance(file_obj, _File)
        return asyncssh.SFTPVFSAttrs.from_local(self.now(file_obj.path, os.statvfs, file_obj.fd))

    # ---- paths ---------------------------------------------------------------------------------------------

    async def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        where = sandbox_path(path)
        return self.attrs(await self.run(where, self.files.stat, where))

    async def lstat(self, path: bytes) -> asyncssh.SFTPAttrs:
        where = sandbox_path(path)
        return self.attrs(await self.run(where, self.files.stat, where, follow=False))

    async def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        where = sandbox_path(path)
        await self.run(where, self.files.set_attrs, where, attr_change(attrs))

    async def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        where = sandbox_path(path)
        await self.run(where, self.files.set_attrs, where, attr_change(attrs), follow=False)

    async def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        where = sandbox_path(path)
        return asyncssh.SFTPVFSAttrs.from_local(await self.run(where, self.files.statvfs, where))

    def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        where = sandbox_path(path)
        fd = self.now(where, self.files.open_fd, where, os.O_RDONLY | os.O_DIRECTORY)
        return _Listing(self, fd, where)

    async def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        where = sandbox_path(path)
        mode = 0o777 if attrs.permissions is None else stat.S_IMODE(attrs.permissions)
        await self.run(where, self.files.mkdir, where, mode)

    async def rmdir(self, path: bytes) -> None:
        where = sandbox_path(path)
        await self.run(where, self.files.rmdir, where)

    async def remove(self, path: bytes) -> None:
        where = sandbox_path(path)
        await self.run(where, self.files.unlink, where)

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = sandbox_path(oldpath), sandbox_path(newpath)
        await self.run(old, self.files.rename, old, new, replace=False)

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = sandbox_path(oldpath), sandbox_path(newpath)
        await self.run(old, self.files.rename, old, new, replace=True)

    async def readlink(self, path: bytes) -> bytes:
        where = sandbox_path(path)
        return await self.run(where, self.files.readlink, where)

    async def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        """A link at ``newpath`` holding ``oldpath`` verbatim (never resolved here)."""
        if not oldpath or b"\x00" in oldpath:
            raise asyncssh.SFTPInvalidParameter("a symbolic link needs a target without NUL")
        where = sandbox_path(newpath)
        await self.run(where, self.files.symlink, oldpath, where)

    async def link(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = sandbox_path(oldpath), sandbox_path(newpath)
        await self.run(new, self.files.link, old, new)

    def realpath(self, path: bytes) -> bytes:
        return lexical_realpath(path)

    def exit(self) -> None:
        """End the subsystem with exit status 0, as sshd reports its sftp-server's (OpenSSH's scp fails
        a transfer whose channel closes without one)."""
        self.channel.exit(0)
        if self._on_exit is not None:
            self._on_exit()


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done
