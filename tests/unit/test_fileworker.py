"""File workers on the real kernel: a process in a user namespace stands in for a sandbox (tests/userns_box.py)
over a tmpfs root, and a worker takes its root's credentials. What the kernel then refuses (inodes the host
owns, files only the host's root may read), what Corral refuses besides (kernel filesystems, device nodes),
paged listings, a worker that stops answering, an abandoned upload; openat2's EAGAIN retried; the wire."""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import os
import signal
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from corral.api.routers.files import (
    RequestTimeout,
    _body,
    _Download,
    decode_list_cursor,
    encode_list_cursor,
    file_error,
)
from corral.domain.errors import InvalidCursor, TemporarilyUnavailable
from corral.node import fileproto
from corral.node.fileclient import (
    AsyncSession,
    WorkerUnavailable,
    end_file_access,
    file_access_count,
    read_small,
    sync_session,
    watch_file_access,
)
from corral.node.files import FileError, SandboxFiles, resolve_user
from corral.runtime import syscalls
from corral.runtime.syscalls import mount, umount
from tests.userns_box import userns_box

OFFSET = 297152  # the stand-in sandbox's root on the host


@dataclass
class Box:
    root: Path
    files: SandboxFiles

    def own(self, path: Path) -> Path:
        os.chown(path, OFFSET, OFFSET, follow_symlinks=False)
        return path


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    root = tmp_path / "root"
    root.mkdir()
    mount("tmpfs", str(root), "tmpfs", 0, "mode=0755")
    try:
        os.chown(root, OFFSET, OFFSET)
        (root / "etc").mkdir()
        (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nbuilder:x:1000:1001::/:/bin/sh\n")
        with userns_box(root, OFFSET) as pid:
            yield Box(root, SandboxFiles(pid, OFFSET, OFFSET))
    finally:
        umount(str(root), lazy=True)


def call(box: Box, *requests: tuple[dict[str, Any], bytes]) -> list[tuple[dict[str, Any], bytes] | Exception]:
    """Each request in one worker session; its reply or the exception it raised."""

    async def session() -> list[tuple[dict[str, Any], bytes] | Exception]:
        worker = await AsyncSession.start(box.files, 10.0)
        out: list[tuple[dict[str, Any], bytes] | Exception] = []
        try:
            for header, data in requests:
                try:
                    out.append(await worker.call(header, data))
                except (OSError, FileError) as exc:
                    out.append(exc)
        finally:
            worker.close()
        return out

    return asyncio.run(session())


def one(box: Box, header: dict[str, Any], data: bytes = b"") -> tuple[dict[str, Any], bytes] | Exception:
    return call(box, (header, data))[0]


def snapshot(path: Path) -> tuple[int, int, int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns


# ---- credentials: what the sandbox's root could not do, the worker cannot do -----------------------------


def test_an_inode_the_host_owns_cannot_be_changed(box: Box) -> None:
    """The device nodes' case: a host-owned inode inside the sandbox's tree (uid 0, unmapped there)."""
    host_file = box.root / "hosts-inode"
    host_file.write_text("host's\n")
    before = snapshot(host_file)
    for change in ({"mode": 0}, {"uid": 0, "gid": 0}, {"atime_ns": 10**18, "mtime_ns": 10**18}, {"size": 0}):
        result = one(box, {"op": "setstat", "path": "/hosts-inode", "change": change, "follow": True})
        assert isinstance(result, OSError), (change, result)
        assert result.errno in (errno.EPERM, errno.EACCES), change
    assert snapshot(host_file) == before
    assert host_file.read_text() == "host's\n"
    # what the sandbox owns it may change
    mine = box.root / "mine"
    mine.write_text("x")
    box.own(mine)
    assert one(box, {"op": "setstat", "path": "/mine", "change": {"mode": 0o600, "uid": 7}}) == (
        {"ok": True},
        b"",
    )
    assert (stat.S_IMODE(mine.stat().st_mode), mine.stat().st_uid) == (0o600, OFFSET + 7)


def test_a_file_only_the_hosts_root_may_read_is_refused(box: Box) -> None:
    secret = box.root / "slabinfo-like"
    secret.write_text("host only\n")
    secret.chmod(0o400)
    result = one(box, {"op": "open_read", "path": "/slabinfo-like"})
    assert isinstance(result, FileError), result
    assert result.kind == "denied"
    with sync_session(box.files) as session, pytest.raises(FileError):
        read_small(session, "/slabinfo-like")


def test_files_are_made_by_the_sandboxs_root(box: Box) -> None:
    replies = call(
        box,
        ({"op": "put", "path": "/made/deep/f", "mode": 0o640, "parents": True}, b""),
        ({"op": "write", "h": 1, "offset": -1}, b"data"),
        ({"op": "commit", "h": 1}, b""),
        ({"op": "mkdir", "path": "/dir", "mode": 0o755}, b""),
    )
    assert replies[2] == ({"ok": True, "size": 4}, b"")
    for path in (box.root / "made", box.root / "made" / "deep" / "f", box.root / "dir"):
        assert (path.stat().st_uid, path.stat().st_gid) == (OFFSET, OFFSET), path
    assert stat.S_IMODE((box.root / "made" / "deep" / "f").stat().st_mode) == 0o640


def test_user_names_resolve_through_a_worker(box: Box) -> None:
    assert resolve_user(box.files, "builder") == "1000:1001"
    with pytest.raises(FileError):
        resolve_user(box.files, "nobody-here")


# ---- refused besides: kernel filesystems, devices ------------------------------------------------------------


def test_kernel_filesystems_and_device_nodes_are_refused(box: Box) -> None:
    version = box.root / "version"
    version.write_text("")
    mount("/proc/version", str(version), "", 4096)  # MS_BIND: a procfs file inside the root
    try:
        os.mknod(box.root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        before = snapshot(box.root / "null")
        results = call(
            box,
            ({"op": "open_read", "path": "/version"}, b""),
            ({"op": "open", "path": "/version", "flags": os.O_RDONLY, "mode": 0}, b""),
            ({"op": "open_read", "path": "/null"}, b""),
            ({"op": "open", "path": "/null", "flags": os.O_WRONLY, "mode": 0}, b""),
            ({"op": "setstat", "path": "/null", "change": {"mode": 0}}, b""),
            ({"op": "setstat", "path": "/version", "change": {"mtime_ns": 0}}, b""),
            # a mount point is not a name the worker may replace, move or remove (the sandbox gets EBUSY)
            ({"op": "put", "path": "/version", "mode": 0o644, "parents": False}, b""),
            ({"op": "unlink", "path": "/version"}, b""),
            ({"op": "rename", "old": "/version", "new": "/moved", "replace": True}, b""),
            ({"op": "put", "path": "/null", "mode": 0o644, "parents": False}, b""),
        )
        assert all(isinstance(r, (OSError, FileError)) for r in results), results
        assert isinstance(results[0], FileError)
        assert results[0].kind == "refused"
        assert snapshot(box.root / "null") == before
        assert sorted(p.name for p in box.root.iterdir()) == ["etc", "null", "version"]
        assert (box.root / "version").read_text().startswith("Linux version")
    finally:
        umount(str(version))


# ---- paged listings ----------------------------------------------------------------------------------------


def test_a_big_directory_is_walked_in_pages(box: Box) -> None:
    many = box.root / "many"
    many.mkdir()
    box.own(many)
    names = {f"f{i:05d}-{'x' * (i % 7)}" for i in range(2500)}
    for name in names:
        (many / name).touch()
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        header: dict[str, Any] = {"op": "list", "path": "/many", "limit": 300}
        if after is not None:
            header["after"] = after
        reply = one(box, header)
        assert not isinstance(reply, Exception), reply
        entries = reply[0]["entries"]
        assert len(entries) <= 300
        seen += [bytes.fromhex(e[0]).decode() for e in entries]
        pages += 1
        after = reply[0]["next"]
        if after is None:
            break
    assert pages == 9
    assert sorted(seen) == seen
    assert len(seen) == len(set(seen)) == len(names)
    assert set(seen) == names


def test_list_cursor_is_opaque_and_bound_to_its_path() -> None:
    cursor = encode_list_cursor("/root/d", b"\xffname")
    assert decode_list_cursor(cursor, "/root/d") == b"\xffname"
    with pytest.raises(InvalidCursor):
        decode_list_cursor(cursor, "/root/other")
    for bad in ("", "!!!", encode_list_cursor("/x", b"a")[:-3], "eyJ4IjoxfQ"):
        with pytest.raises(InvalidCursor):
            decode_list_cursor(bad, "/x")


# ---- a worker that does not answer; an upload left unfinished --------------------------------------------------


def test_a_worker_that_misses_its_deadline_is_killed(box: Box) -> None:
    async def scenario() -> int:
        worker = await AsyncSession.start(box.files, 10.0)
        try:
            os.kill(worker.pid, signal.SIGSTOP)  # stands in for a read blocked in the kernel
            started = time.monotonic()
            with pytest.raises(WorkerUnavailable):
                await worker.call({"op": "ping"}, deadline_s=0.5)
            assert time.monotonic() - started < 5
            with pytest.raises(WorkerUnavailable):
                await worker.call({"op": "ping"})  # the session is over
            return worker.pid
        finally:
            worker.close()

    pid = asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and _uid_of(pid) == OFFSET and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or _uid_of(pid) != OFFSET


def _uid_of(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def test_an_upload_never_committed_leaves_nothing(box: Box) -> None:
    async def scenario() -> None:
        worker = await AsyncSession.start(box.files, 10.0)
        reply, _ = await worker.call({"op": "put", "path": "/partial", "mode": 0o644, "parents": False})
        await worker.call({"op": "write", "h": reply["h"], "offset": -1}, b"half of it")
        worker.close()  # the client went away

    asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while any(box.root.iterdir()) and time.monotonic() < deadline:
        if [p.name for p in box.root.iterdir()] == ["etc"]:
            break
        time.sleep(0.05)
    assert [p.name for p in box.root.iterdir()] == ["etc"]


def test_an_upload_body_that_stops_arriving_times_out() -> None:
    async def scenario() -> list[bytes]:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"x", "more_body": True}
            await asyncio.sleep(3600)  # a client that sends nothing more
            return {"type": "http.disconnect"}

        request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
        got: list[bytes] = []

        async def drain() -> None:
            async for chunk in _body(request, 0.2):
                got.append(chunk)

        with pytest.raises(RequestTimeout):
            await drain()
        return got

    assert asyncio.run(scenario()) == [b"x"]
    assert (RequestTimeout("x").status, RequestTimeout("x").code) == (408, "request_timeout")


def test_a_gone_sandbox_is_not_running(tmp_path: Path) -> None:
    with pytest.raises(FileError) as gone:
        asyncio.run(AsyncSession.start(SandboxFiles(2**22 + 12345, OFFSET, OFFSET), 5.0))
    assert gone.value.kind == "not_running"


# ---- finding 20: openat2's EAGAIN ---------------------------------------------------------------------------


class _AgainThenOpen:
    """A stand-in libc whose openat2 says EAGAIN ``times`` times, then opens ``/``."""

    def __init__(self, times: int) -> None:
        self.left = times
        self.calls = 0

    def syscall(self, *args: object) -> int:
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            ctypes.set_errno(errno.EAGAIN)
            return -1
        return os.open("/", os.O_PATH)


def test_openat2_retries_eagain_then_reports_it_as_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _AgainThenOpen(3)
    monkeypatch.setattr(syscalls, "_libc", fake)
    fd = syscalls.openat2(0, "/x", os.O_PATH)
    os.close(fd)
    assert fake.calls == 4
    monkeypatch.setattr(syscalls, "_libc", _AgainThenOpen(10**6))
    with pytest.raises(OSError, match="Resource temporarily unavailable") as failed:
        syscalls.openat2(0, "/x", os.O_PATH)
    assert failed.value.errno == errno.EAGAIN
    # ... which the API answers 503 with Retry-After, never 400 invalid_path
    answer = file_error(failed.value, "/root/up/hostname")
    assert isinstance(answer, TemporarilyUnavailable)
    assert (answer.status, answer.code, answer.retry_after) == (503, "temporarily_unavailable", 1)


def test_openat2_through_dotdot_survives_renames_elsewhere() -> None:
    """The kernel's EAGAIN is real: a path with ``..`` resolved while the host renames something (anything)
    fails now and then without the retry (about 1 in 10000 here)."""
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(f"{d}/a/b/c")
        stop = threading.Event()

        def renamer() -> None:
            i = 0
            while not stop.is_set():
                os.mkdir(f"{d}/r{i}")
                os.rename(f"{d}/r{i}", f"{d}/s{i}")
                os.rmdir(f"{d}/s{i}")
                i += 1

        thread = threading.Thread(target=renamer)
        thread.start()
        root = os.open(d, os.O_PATH)
        try:
            for _ in range(60_000):
                os.close(syscalls.openat2(root, "a/b/c/../../b/c/../..", os.O_PATH))
        finally:
            stop.set()
            thread.join()
            os.close(root)


# ---- the wire ----------------------------------------------------------------------------------------------


def test_frames_round_trip_and_oversize_is_refused() -> None:
    frame = fileproto.encode({"op": "write", "h": 3}, b"\x00data")
    text_len, data_len = fileproto.sizes(frame[: fileproto.HEADER.size])
    body = frame[fileproto.HEADER.size :]
    assert fileproto.decode_header(body[:text_len]) == {"op": "write", "h": 3}
    assert body[text_len:] == b"\x00data"
    assert data_len == 5
    with pytest.raises(fileproto.ProtocolError):
        fileproto.sizes(fileproto.HEADER.pack(fileproto.MAX_JSON + 1, 0))
    with pytest.raises(fileproto.ProtocolError):
        fileproto.decode_header(b"[1]")
    st = os.stat("/")
    back = fileproto.stat_from_wire(fileproto.stat_to_wire(st))
    assert (back.st_mode, back.st_ino, back.st_mtime_ns, back.st_size) == (
        st.st_mode,
        st.st_ino,
        st.st_mtime_ns,
        st.st_size,
    )
    with pytest.raises(fileproto.ProtocolError):
        fileproto.stat_from_wire([1, 2, "3"])


def test_a_full_page_of_the_longest_names_fits(box: Box) -> None:
    """Review 2 L4: the documented maximum (10000 entries) of 255-byte names, as a listing page and as one
    readdir, comes back in one frame (names travel hex-encoded: twice their size)."""
    many = box.root / "long"
    many.mkdir()
    box.own(many)
    names = {f"{i:05d}".rjust(255, "n") for i in range(10_000)}
    for name in names:
        (many / name).touch()
    listed = one(box, {"op": "list", "path": "/long", "limit": 10_000})
    assert not isinstance(listed, Exception), listed
    assert {bytes.fromhex(e[0]).decode() for e in listed[0]["entries"]} == names
    assert listed[0]["next"] is None

    async def readdir() -> list[Any]:
        worker = await AsyncSession.start(box.files, 10.0)
        try:
            reply, _ = await worker.call({"op": "opendir", "path": "/long"})
            page, _ = await worker.call({"op": "readdir", "h": reply["h"], "count": 10_000})
            entries: list[Any] = page["entries"]
            return entries
        finally:
            worker.close()

    entries = asyncio.run(readdir())
    assert len(entries) == 10_002  # ".", ".." and every name
    worst = {
        "ok": True,
        "entries": [["ff" * 255, "directory", 2**63 - 1, "7777", 1e12] for _ in range(10_000)],
    }
    fileproto.encode(worst, b"")  # the largest listing page there can be: within the frame's limit


def test_ending_a_sandboxs_file_access_kills_its_workers(box: Box) -> None:
    """Review 2 H2: ``end_file_access(cid)`` kills every worker of that sandbox (by pidfd) and tells its
    watchers; a worker of another sandbox is left alone; a session started afterwards still works."""
    mine = dataclasses.replace(box.files, cid="box-mine")
    other = dataclasses.replace(box.files, cid="box-other")
    told: list[str] = []

    async def scenario() -> tuple[int, int]:
        first = await AsyncSession.start(mine, 10.0)
        second = await AsyncSession.start(other, 10.0)
        unwatch = watch_file_access("box-mine", lambda: told.append("ended"))
        try:
            assert file_access_count("box-mine") == 2
            assert end_file_access("box-mine") == 2
            with pytest.raises(FileError) as gone:
                await first.call({"op": "ping"})
            assert gone.value.kind == "not_running"
            await second.call({"op": "ping"})  # another sandbox's worker is untouched
            third = await AsyncSession.start(mine, 10.0)  # the sandbox runs again: a new session works
            try:
                await third.call({"op": "ping"})
            finally:
                third.close()
            return first.pid, second.pid
        finally:
            unwatch()
            first.close()
            second.close()

    killed, kept = asyncio.run(scenario())
    assert told == ["ended"]
    deadline = time.monotonic() + 5
    while _uid_of(killed) == OFFSET and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _uid_of(killed) != OFFSET  # gone (or the PID reused by someone else)
    assert file_access_count("box-mine") == 0
    assert file_access_count("box-other") == 0
    assert kept != killed


def _trickle(every_s: float, size: int, count: int | None = None) -> Request:
    """A request whose body comes ``size`` bytes every ``every_s`` seconds (``count`` times, or for ever)."""
    sent = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        await asyncio.sleep(every_s)
        sent += 1
        more = count is None or sent < count
        return {"type": "http.request", "body": b"x" * size, "more_body": more}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


def test_an_upload_trickled_below_the_minimum_rate_times_out() -> None:
    """Review 2 L1: a body sending a byte now and then (never idle for the idle timeout) is ended once a
    window brings less than the minimum rate; one at a fair rate is taken whole."""

    async def drain(request: Request, min_rate: int) -> int:
        got = 0
        async with asyncio.timeout(10):  # without a minimum rate the trickle would never end
            async for chunk in _body(request, 0.3, min_rate):
                got += len(chunk)
        return got

    with pytest.raises(RequestTimeout, match="bytes a second"):
        asyncio.run(drain(_trickle(0.05, 1), 1000))
    assert asyncio.run(drain(_trickle(0.02, 1000, count=40), 1000)) == 40_000


@pytest.mark.parametrize("spec", ["2.0", "2.4"])
def test_a_download_whose_client_reads_nothing_is_ended(spec: str) -> None:
    """Review 2 L1: a client that stops reading (its sends block) ends the download after the send timeout,
    giving back the worker and the slot."""
    done: list[bool] = []

    async def content() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 1024

    async def scenario() -> None:
        sends = 0

        async def send(message: Any) -> None:
            nonlocal sends
            sends += 1
            if sends > 2:
                await asyncio.sleep(3600)  # the socket's buffers are full: the client reads nothing

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        response = _Download(content(), lambda: done.append(True), send_timeout_s=0.3)
        scope = {"type": "http", "asgi": {"spec_version": spec}, "method": "GET", "path": "/"}
        async with asyncio.timeout(10):
            await response(scope, receive, send)

    asyncio.run(scenario())
    assert done == [True]
