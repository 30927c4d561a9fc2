"""File workers: the processes that do a tenant's file operations with the sandbox's own credentials.

``python -m corral.node.fileworker`` is the fork server the node starts once (single-threaded: only such a
process may enter a user namespace), with a scrubbed environment. Its stdin is a unix socket; each message on
it carries, as SCM_RIGHTS, a session socket, the sandbox's root (an O_PATH fd), its user namespace and the
``cgroup.procs`` of each of its cgroups, all opened by the host. For each it forks a worker, which joins those
cgroups (its CPU, memory and PIDs are the sandbox's), drops every supplementary group, enters the namespace and
becomes the sandbox's root (uid/gid 0 there: the sandbox's id range on the host, capabilities only inside that namespace). The
kernel then refuses whatever the sandbox's own root could not do: the host kernel log, real addresses in
kallsyms and pagemap, device inodes of the host. Paths still resolve in the root fd with RESOLVE_IN_ROOT.
The worker keeps the host's mount, PID and network namespaces on purpose: it reaches nothing by those (every
path is resolved in the root fd, no magic links, no capability outside the sandbox's user namespace), and the
sandbox cannot see or signal it.

A worker first sends a hello frame ``{"pid"}`` with a pidfd of itself (the host ends it by that, never by a
number that could be reused), then answers one request at a time (``fileproto``) until its socket closes,
and dies with the fork server (parent-death signal)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from corral.node import fileproto
from corral.node.files import AttrChange, FileError, SandboxFiles, Upload, normalise
from corral.runtime.syscalls import set_parent_death_signal

MAX_READ = 4 * 1024 * 1024
MAX_PAGE = 10_000
MAX_FDS = 3 + 32  # a session, the root, the user namespace, and a cgroup.procs per cgroup hierarchy


# ---- the fork server ----------------------------------------------------------------------------------------


def fork_server(control: socket.socket) -> None:
    """Hand every session the host sends to a worker, until the host closes ``control``. One worker is forked
    ahead (a spare, waiting for its session), so a request does not wait for a fork."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    spare = _spare(control)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(control, 64, MAX_FDS)
        except InterruptedError:
            continue
        if not msg:
            return
        try:
            if len(fds) < 3:
                continue
            for _attempt in range(2):
                try:
                    socket.send_fds(spare, [b"s"], fds)
                    break
                except OSError:  # the spare ended: fork another
                    spare.close()
                    spare = _spare(control)
            spare.close()
            spare = _spare(control)
        finally:
            for fd in fds:
                os.close(fd)


def _spare(control: socket.socket) -> socket.socket:
    """Fork a worker that waits for its session's fds on the returned socket (and ends with this process)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ours.close()
            control.close()
            set_parent_death_signal(signal.SIGKILL)
            msg, fds, _flags, _addr = socket.recv_fds(theirs, 64, MAX_FDS)
            theirs.close()
            if msg and len(fds) >= 3:
                code = worker(*fds)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    theirs.close()
    return ours


def enter(userns: int) -> None:
    """Become the root of the sandbox whose user namespace ``userns`` is (no host capability is kept)."""
    os.setgroups([])
    os.setns(userns, os.CLONE_NEWUSER)
    os.close(userns)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    set_parent_death_signal(signal.SIGKILL)  # after the credential change, which clears it


def join_cgroups(procs: tuple[int, ...]) -> None:
    """Move this process into the sandbox's cgroups (each ``cgroup.procs`` the host opened for writing), as
    the host's root still: from then on its CPU, memory and PIDs are the sandbox's, capped by its limits."""
    pid = str(os.getpid()).encode()
    for fd in procs:
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)


def worker(session: int, root: int, userns: int, *procs: int) -> int:
    sock = socket.socket(fileno=session)
    try:
        join_cgroups(procs)
        enter(userns)
    except OSError as exc:
        with contextlib.suppress(OSError):
            sock.sendall(fileproto.HELLO.pack(0))
        print(f"file worker: cannot enter the sandbox: {exc}", file=sys.stderr)
        return 1
    if os.getppid() == 1:  # the fork server ended meanwhile
        return 1
    pidfd = os.pidfd_open(os.getpid())
    socket.send_fds(sock, [fileproto.HELLO.pack(os.getpid())], [pidfd])
    os.close(pidfd)
    files = SandboxFiles(0, 0, 0, root_dir=f"/proc/self/fd/{root}", confined=True)
    Worker(files, sock).serve()
    return 0


# ---- one worker -----------------------------------------------------------------------------------------------


@dataclass
class _Dir:
    fd: int
    path: str
    scan: Iterator[os.DirEntry[str]] | None = None
    started: bool = False

    def close(self) -> None:
        if self.scan is not None:
            with contextlib.suppress(Exception):
                getattr(self.scan, "close", lambda: None)()
        os.close(self.fd)


@dataclass
class Worker:
    files: SandboxFiles
    sock: socket.socket
    handles: dict[int, int | _Dir | Upload] = field(default_factory=dict)
    next_handle: int = 1

    def serve(self) -> None:
        try:
            while (request := self._receive()) is not None:
                header, data = request
                try:
                    reply, payload = self.dispatch(header, data)
                    out = fileproto.encode({"ok": True, **reply}, payload)
                except FileError as exc:
                    out = fileproto.encode(fileproto.error_reply(0, exc.kind, str(exc)))
                except OSError as exc:
                    out = fileproto.encode(
                        fileproto.error_reply(exc.errno or 0, "", exc.strerror or str(exc))
                    )
                except fileproto.ProtocolError:  # an answer over the frame's limit: said, never fatal
                    out = fileproto.encode(
                        fileproto.error_reply(
                            errno.E2BIG, "too_large", "the answer is too large; ask for less"
                        )
                    )
                except (ValueError, TypeError, KeyError, UnicodeError) as exc:
                    out = fileproto.encode(fileproto.error_reply(errno.EINVAL, "invalid", str(exc)))
                self.sock.sendall(out)
        finally:
            for handle in list(self.handles.values()):
                self._close(handle)

    def _receive(self) -> tuple[dict[str, Any], bytes] | None:
        prefix = self._exactly(fileproto.HEADER.size)
        if prefix is None:
            return None
        text_len, data_len = fileproto.sizes(prefix)
        text = self._exactly(text_len)
        data = self._exactly(data_len) if data_len else b""
        if text is None or data is None:
            return None
        return fileproto.decode_header(text), data

    def _exactly(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    # ---- handles ---------------------------------------------------------------------------------------

    def _add(self, handle: int | _Dir | Upload) -> int:
        number = self.next_handle
        self.next_handle += 1
        self.handles[number] = handle
        return number

    def _fd(self, header: dict[str, Any]) -> int:
        handle = self.handles.get(int(header["h"]))
        if not isinstance(handle, int):
            raise OSError(errno.EBADF, "not an open file")
        return handle

    @staticmethod
    def _close(handle: int | _Dir | Upload) -> None:
        if isinstance(handle, _Dir):
            handle.close()
        elif isinstance(handle, Upload):
            handle.abort()
        else:
            os.close(handle)

    # ---- operations --------------------------------------------------------------------------------------

    def dispatch(self, header: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        op = header.get("op")
        handler: Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]] | None = getattr(
            self, f"op_{op}", None
        )
        if not isinstance(op, str) or handler is None:
            raise ValueError(f"unknown operation {op!r}")
        return handler(header, data)

    def op_ping(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        return {}, b""

    def op_open(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        fd = self.files.open_file(str(h["path"]), int(h["flags"]), int(h["mode"]))
        return {"h": self._add(fd)}, b""

    def op_open_read(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        fd = self.files.open_read(normalise(str(h["path"])))
        return {"h": self._add(fd), "size": os.fstat(fd).st_size}, b""

    def op_read(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        fd, size, offset = self._fd(h), min(int(h["size"]), MAX_READ), int(h.get("offset", -1))
        return {}, os.read(fd, size) if offset < 0 else os.pread(fd, size, offset)

    def op_write(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        handle = self.handles.get(int(h["h"]))
        if isinstance(handle, Upload):
            handle.write(data)
            return {"n": len(data)}, b""
        fd, offset, view, done = self._fd(h), int(h["offset"]), memoryview(data), 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        return {"n": done}, b""

    def op_close(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        handle = self.handles.pop(int(h["h"]), None)
        if handle is not None:
            self._close(handle)
        return {}, b""

    def op_fstat(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        return {"st": fileproto.stat_to_wire(os.fstat(self._fd(h)))}, b""

    def op_fsetstat(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        self.files.set_fd_attrs(self._fd(h), _change(h["change"]))
        return {}, b""

    def op_fsync(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        os.fsync(self._fd(h))
        return {}, b""

    def op_fstatvfs(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        return {"vfs": _vfs(os.statvfs(self._fd(h)))}, b""

    def op_stat(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        st = self.files.stat(str(h["path"]), follow=bool(h.get("follow", True)))
        return {"st": fileproto.stat_to_wire(st)}, b""

    def op_setstat(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        self.files.set_attrs(str(h["path"]), _change(h["change"]), follow=bool(h.get("follow", True)))
        return {}, b""

    def op_statvfs(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        return {"vfs": _vfs(self.files.statvfs(str(h["path"])))}, b""

    def op_opendir(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        path = str(h["path"])
        fd = self.files.open_fd(path, os.O_RDONLY | os.O_DIRECTORY)
        return {"h": self._add(_Dir(fd, path))}, b""

    def op_readdir(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        """The next entries of an open directory (``.`` and ``..`` first); an empty list is the end."""
        handle = self.handles.get(int(h["h"]))
        if not isinstance(handle, _Dir):
            raise OSError(errno.EBADF, "not an open directory")
        count = max(1, min(int(h.get("count", 256)), MAX_PAGE))
        found = []
        if not handle.started:
            handle.started = True
            found = self.files.dir_start(handle.fd, handle.path)
            handle.scan = os.scandir(handle.fd)
        if handle.scan is not None:
            found += self.files.dir_next(handle.fd, handle.scan, count)
        return {"entries": [[os.fsencode(n).hex(), fileproto.stat_to_wire(st)] for n, st in found]}, b""

    def op_list(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        after = bytes.fromhex(h["after"]) if h.get("after") is not None else None
        limit = max(1, min(int(h["limit"]), MAX_PAGE))
        entries, following = self.files.list_page(str(h["path"]), after, limit)
        return {
            "entries": [
                [os.fsencode(e.name).hex(), e.type, e.size, e.mode, e.mtime.astimezone(UTC).timestamp()]
                for e in entries
            ],
            "next": None if following is None else following.hex(),
        }, b""

    def op_read_small(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        return {}, self.files.read_small(str(h["path"]), min(int(h["limit"]), MAX_READ))

    def op_put(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        upload = self.files.begin_write(str(h["path"]), mode=int(h["mode"]), parents=bool(h["parents"]))
        return {"h": self._add(upload)}, b""

    def op_commit(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        upload = self.handles.pop(int(h["h"]), None)
        if not isinstance(upload, Upload):
            raise OSError(errno.EBADF, "not an upload")
        try:
            return {"size": upload.commit()}, b""
        finally:
            upload.abort()

    def op_mkdir(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        self.files.mkdir(str(h["path"]), int(h["mode"]))
        return {}, b""

    def op_rmdir(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        self.files.rmdir(str(h["path"]))
        return {}, b""

    def op_unlink(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        self.files.unlink(str(h["path"]))
        return {}, b""

    def op_rename(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        self.files.rename(str(h["old"]), str(h["new"]), replace=bool(h["replace"]))
        return {}, b""

    def op_symlink(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        self.files.symlink(data, str(h["path"]))
        return {}, b""

    def op_link(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        self.files.link(str(h["old"]), str(h["new"]))
        return {}, b""

    def op_readlink(self, h: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        return {}, self.files.readlink(str(h["path"]))


def _change(raw: dict[str, Any]) -> AttrChange:
    def opt(name: str) -> int | None:
        value = raw.get(name)
        return None if value is None else int(value)

    return AttrChange(
        size=opt("size"),
        uid=opt("uid"),
        gid=opt("gid"),
        mode=opt("mode"),
        atime_ns=opt("atime_ns"),
        mtime_ns=opt("mtime_ns"),
    )


def _vfs(v: os.statvfs_result) -> list[int]:
    return [
        v.f_bsize,
        v.f_frsize,
        v.f_blocks,
        v.f_bfree,
        v.f_bavail,
        v.f_files,
        v.f_ffree,
        v.f_favail,
        v.f_fsid,
        v.f_flag,
        v.f_namemax,
    ]


if __name__ == "__main__":
    fork_server(socket.socket(fileno=sys.stdin.fileno()))
