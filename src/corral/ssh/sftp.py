"""The SFTP subsystem of the SSH gateway (``sftp``, and ``scp``, which speaks SFTP): a sandbox's files as its
root sees them. Nothing here touches a file: every operation is a request to the session's file worker
(``corral.node.fileworker``), a process holding the sandbox root's credentials (its user namespace, no host
capability) that runs :class:`SandboxFiles`' confined primitives (openat2 with RESOLVE_IN_ROOT; the last
component of a path that must not be followed is acted on by name in its parent). The event loop only waits
for answers, each with a deadline; a worker that misses one is killed. New files belong to the sandbox's root
and ids are the sandbox's own. Paths are relative to the session's home, ``/root``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import posixpath
import stat
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncssh

from corral.domain.bulkhead import Bulkhead, Scope
from corral.node import fileproto
from corral.node.fileclient import AsyncSession, watch_file_access
from corral.node.files import AttrChange, FileError, SandboxFiles

HOME = "/root"
MAX_READ = 4 * 1024 * 1024  # a larger read request is answered short, as SFTP allows
PAGE = 256  # directory entries asked of the worker at a time
_NS = 1_000_000_000

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
    errno.EAGAIN: asyncssh.SFTPFailure,
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
    if isinstance(exc, FileError) and exc.kind == "not_found":
        return asyncssh.SFTPNoSuchFile(str(exc))
    if isinstance(exc, FileError) and exc.kind in ("denied", "refused"):
        return asyncssh.SFTPPermissionDenied(str(exc))
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


@dataclasses.dataclass
class _File:
    """An open file of the sandbox: the worker's handle for it."""

    handle: int
    path: str


def _change_wire(change: AttrChange) -> dict[str, int | None]:
    return dataclasses.asdict(change)


class _Listing:
    """A directory listing, read from the worker a page at a time (``.`` and ``..`` first); the worker's
    handle is closed at the end."""

    def __init__(self, server: SandboxSFTP, path: str) -> None:
        self._server = server
        self._path = path
        self._handle: int | None = None
        self._page: list[asyncssh.SFTPName] = []
        self._done = False

    def __aiter__(self) -> _Listing:
        return self

    async def __anext__(self) -> asyncssh.SFTPName:
        if not self._page and not self._done:
            await self._fill()
        if not self._page:
            raise StopAsyncIteration
        return self._page.pop()

    async def _fill(self) -> None:
        server, where = self._server, self._path
        if self._handle is None:
            reply, _ = await server.call(where, {"op": "opendir", "path": where})
            self._handle = int(reply["h"])
        reply, _ = await server.call(where, {"op": "readdir", "h": self._handle, "count": PAGE})
        entries = reply["entries"]
        if not entries:
            self._done = True
            await server.call(where, {"op": "close", "h": self._handle})
            return
        await server.load_names()
        self._page = [
            asyncssh.SFTPName(bytes.fromhex(name), attrs=server.attrs(fileproto.stat_from_wire(st)))
            for name, st in entries
        ]
        self._page.reverse()


class SandboxSFTP(asyncssh.SFTPServer):
    """An SFTP session as the root of the sandbox ``files`` reaches, confined to its root, served by a file
    worker started at the first request (``session``: one already started, for tests)."""

    def __init__(
        self,
        chan: asyncssh.SSHServerChannel[bytes],
        files: SandboxFiles,
        on_exit: Callable[[], None] | None = None,
        *,
        timeout_s: float = 30.0,
    ) -> None:
        super().__init__(chan)
        self.files = files
        self._on_exit = on_exit
        self._timeout_s = timeout_s
        self._names: dict[str, dict[int, str]] | None = None
        self._session: AsyncSession | None = None
        self._starting = asyncio.Lock()
        self._closed = False
        self._refused: str | None = None
        self._slot: tuple[Bulkhead, list[Scope]] | None = None
        self._exited = False
        self._take_slot(chan)
        loop = asyncio.get_running_loop()

        def on_end() -> None:
            loop.call_soon_threadsafe(self.end)

        self._unwatch = watch_file_access(files.cid, on_end)

    def _take_slot(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        """An SFTP session counts as one of the SSH sessions of its account and VM (the gateway's session
        bulkhead, when it has one): past the cap every request fails, saying why."""
        owner = chan.get_connection().get_owner()
        limits, target = getattr(owner, "limits", None), getattr(owner, "target", None)
        sessions = getattr(limits, "sessions", None)
        if not isinstance(sessions, Bulkhead) or target is None:
            return
        scopes: list[Scope] = [("user", str(target.user_id)), ("vm", str(target.vm_id))]
        full = sessions.try_acquire(scopes)
        if full is not None:
            where = "your account" if full[0] == "user" else "this VM"
            self._refused = f"{where} has too many sessions open; retry when one ends"
        else:
            self._slot = (sessions, scopes)

    # ---- plumbing ------------------------------------------------------------------------------------------

    async def worker(self) -> AsyncSession:
        async with self._starting:
            if self._refused is not None:
                raise asyncssh.SFTPFailure(self._refused)
            if self._closed:
                raise asyncssh.SFTPFailure("the session has ended")
            if self._session is None:
                session = await AsyncSession.start(self.files, self._timeout_s)
                if self._closed:  # the subsystem ended while the worker started
                    session.close()
                    raise asyncssh.SFTPFailure("the session has ended")
                self._session = session
            return self._session

    async def call(
        self, path: str, header: dict[str, Any], data: bytes = b""
    ) -> tuple[dict[str, Any], bytes]:
        """One request to the worker, failures as SFTP statuses."""
        try:
            return await (await self.worker()).call(header, data)
        except (OSError, FileError, UnicodeError) as exc:
            raise status(exc, path) from None

    async def load_names(self) -> None:
        """The sandbox's user and group names (read once per session, as its root reads them)."""
        if self._names is not None:
            return
        names: dict[str, dict[int, str]] = {}
        for table in ("/etc/passwd", "/etc/group"):
            try:
                _, data = await (await self.worker()).call(
                    {"op": "read_small", "path": table, "limit": 256 * 1024}
                )
                names[table] = id_names(data.decode(errors="replace"))
            except (OSError, FileError):
                names[table] = {}
        self._names = names

    def _id_name(self, table: str, ident: int | None) -> str:
        if ident is None:
            return ""
        return (self._names or {}).get(table, {}).get(ident, str(ident))

    def format_user(self, uid: int | None) -> str:
        return self._id_name("/etc/passwd", uid)

    def format_group(self, gid: int | None) -> str:
        return self._id_name("/etc/group", gid)

    def attrs(self, st: os.stat_result) -> asyncssh.SFTPAttrs:
        """SFTP attributes of ``st`` (a stat made in the sandbox's namespace: its own ids)."""
        attrs = asyncssh.SFTPAttrs.from_local(st)
        attrs.owner = self.format_user(attrs.uid)
        attrs.group = self.format_group(attrs.gid)
        attrs.nlink = st.st_nlink
        return attrs

    async def _stat_reply(self, path: str, header: dict[str, Any]) -> asyncssh.SFTPAttrs:
        reply, _ = await self.call(path, header)
        await self.load_names()
        return self.attrs(fileproto.stat_from_wire(reply["st"]))

    async def _vfs_reply(self, path: str, header: dict[str, Any]) -> asyncssh.SFTPVFSAttrs:
        reply, _ = await self.call(path, header)
        bsize, frsize, blocks, bfree, bavail, files, ffree, favail, fsid, flag, namemax = reply["vfs"]
        return asyncssh.SFTPVFSAttrs(
            bsize, frsize, blocks, bfree, bavail, files, ffree, favail, fsid, flag, namemax
        )

    # ---- files ---------------------------------------------------------------------------------------------

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        where = sandbox_path(path)
        mode = 0o666 if attrs.permissions is None else stat.S_IMODE(attrs.permissions)
        reply, _ = await self.call(
            where, {"op": "open", "path": where, "flags": open_flags(pflags), "mode": mode}
        )
        return _File(int(reply["h"]), where)

    async def open56(self, path: bytes, desired_access: int, flags: int, attrs: asyncssh.SFTPAttrs) -> object:
        return await self.open(path, v3_pflags(desired_access, flags), attrs)

    async def close(self, file_obj: object) -> None:
        """Close a file; never fails (asyncssh closes what is left this way when the session ends, and the
        worker closes everything when it ends)."""
        assert isinstance(file_obj, _File)
        if self._session is not None and not self._closed:
            with contextlib.suppress(asyncssh.SFTPError):
                await self.call(file_obj.path, {"op": "close", "h": file_obj.handle})

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        assert isinstance(file_obj, _File)
        request = {"op": "read", "h": file_obj.handle, "offset": offset, "size": min(size, MAX_READ)}
        _, data = await self.call(file_obj.path, request)
        return data

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        assert isinstance(file_obj, _File)
        reply, _ = await self.call(
            file_obj.path, {"op": "write", "h": file_obj.handle, "offset": offset}, data
        )
        return int(reply["n"])

    async def fstat(self, file_obj: object) -> asyncssh.SFTPAttrs:
        assert isinstance(file_obj, _File)
        return await self._stat_reply(file_obj.path, {"op": "fstat", "h": file_obj.handle})

    async def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        assert isinstance(file_obj, _File)
        change = _change_wire(attr_change(attrs))
        await self.call(file_obj.path, {"op": "fsetstat", "h": file_obj.handle, "change": change})

    async def fsync(self, file_obj: object) -> None:
        assert isinstance(file_obj, _File)
        await self.call(file_obj.path, {"op": "fsync", "h": file_obj.handle})

    async def fstatvfs(self, file_obj: object) -> asyncssh.SFTPVFSAttrs:
        assert isinstance(file_obj, _File)
        return await self._vfs_reply(file_obj.path, {"op": "fstatvfs", "h": file_obj.handle})

    # ---- paths ---------------------------------------------------------------------------------------------

    async def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        where = sandbox_path(path)
        return await self._stat_reply(where, {"op": "stat", "path": where, "follow": True})

    async def lstat(self, path: bytes) -> asyncssh.SFTPAttrs:
        where = sandbox_path(path)
        return await self._stat_reply(where, {"op": "stat", "path": where, "follow": False})

    async def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        where = sandbox_path(path)
        change = _change_wire(attr_change(attrs))
        await self.call(where, {"op": "setstat", "path": where, "change": change, "follow": True})

    async def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        where = sandbox_path(path)
        change = _change_wire(attr_change(attrs))
        await self.call(where, {"op": "setstat", "path": where, "change": change, "follow": False})

    async def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        where = sandbox_path(path)
        return await self._vfs_reply(where, {"op": "statvfs", "path": where})

    def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        return _Listing(self, sandbox_path(path))

    async def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        where = sandbox_path(path)
        mode = 0o777 if attrs.permissions is None else stat.S_IMODE(attrs.permissions)
        await self.call(where, {"op": "mkdir", "path": where, "mode": mode})

    async def rmdir(self, path: bytes) -> None:
        where = sandbox_path(path)
        await self.call(where, {"op": "rmdir", "path": where})

    async def remove(self, path: bytes) -> None:
        where = sandbox_path(path)
        await self.call(where, {"op": "unlink", "path": where})

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = sandbox_path(oldpath), sandbox_path(newpath)
        await self.call(old, {"op": "rename", "old": old, "new": new, "replace": False})

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = sandbox_path(oldpath), sandbox_path(newpath)
        await self.call(old, {"op": "rename", "old": old, "new": new, "replace": True})

    async def readlink(self, path: bytes) -> bytes:
        where = sandbox_path(path)
        _, target = await self.call(where, {"op": "readlink", "path": where})
        return target

    async def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        """A link at ``newpath`` holding ``oldpath`` verbatim (never resolved here)."""
        if not oldpath or b"\x00" in oldpath:
            raise asyncssh.SFTPInvalidParameter("a symbolic link needs a target without NUL")
        where = sandbox_path(newpath)
        await self.call(where, {"op": "symlink", "path": where}, oldpath)

    async def link(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = sandbox_path(oldpath), sandbox_path(newpath)
        await self.call(new, {"op": "link", "old": old, "new": new})

    def realpath(self, path: bytes) -> bytes:
        return lexical_realpath(path)

    def end(self) -> None:
        """The sandbox is going away (stop, destroy, hibernate...): the session closes now, its worker is
        already killed (``end_file_access``)."""
        if not self._exited:
            self._release()
            self.channel.exit(1)

    def exit(self) -> None:
        """End the subsystem with exit status 0, as sshd reports its sftp-server's (OpenSSH's scp fails
        a transfer whose channel closes without one); the worker ends with the session."""
        if not self._exited:
            self._release()
            self.channel.exit(0)

    def _release(self) -> None:
        self._exited = True
        self._unwatch()
        self._closed = True
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._slot is not None:
            self._slot[0].release(self._slot[1])
            self._slot = None
        if self._on_exit is not None:
            self._on_exit()
