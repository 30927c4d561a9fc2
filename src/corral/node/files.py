"""Files inside a running sandbox, reached from the host through ``/proc/<init>/root`` with openat2's
RESOLVE_IN_ROOT: ``..``, absolute symlinks and links pointing out all resolve inside the sandbox's root (and
its own mounts), never on the host. New files and directories belong to the sandbox's root user."""

from __future__ import annotations

import contextlib
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
