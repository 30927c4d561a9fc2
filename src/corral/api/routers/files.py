"""Moving files in and out of a VM: ``/v1/vms/{vm_id}/files`` (isorun's paths).

Every operation is done by a file worker holding the sandbox root's credentials (``corral.node.fileworker``),
one per request, driven from the event loop: no thread is held while a body trickles in or a file is slow to
read, each worker call has a deadline, and uploads, downloads and listings are capped per API key and per VM
(429 ``too_many_concurrent``)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive, Scope, Send

from corral.api.deps import PrincipalDep, StateDep
from corral.api.routers.common import AUTHED, errors
from corral.api.routers.vms import lifecycle_of
from corral.api.schemas import FileEntryOut, FileListOut, UploadOut
from corral.config import Settings
from corral.domain.bulkhead import Bulkhead, Caps
from corral.domain.bulkhead import Scope as SlotScope
from corral.domain.errors import (
    BadRequest,
    Conflict,
    CorralError,
    InvalidCursor,
    InvalidParameter,
    NotFound,
    TemporarilyUnavailable,
)
from corral.node.fileclient import AsyncSession
from corral.node.files import CHUNK, FileError, SandboxFiles, normalise, translate
from corral.node.local import NodeError
from corral.services.lifecycle import Lifecycle

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/vms", tags=["exec and files"])
VmId = Annotated[str, Path(description="The VM ID")]
FilePath = Annotated[str, Query(description="Absolute path inside the sandbox", max_length=4096)]
LIST_DEFAULT = 1000
LIST_MAX = 10_000
WRITE_BATCH = 1024 * 1024  # body chunks are gathered up to this much per write to the worker


class DiskFull(CorralError):
    status = 507
    code = "disk_full"


class RequestTimeout(CorralError):
    status = 408
    code = "request_timeout"


@dataclass(frozen=True)
class FileLimits:
    uploads: Bulkhead
    downloads: Bulkhead
    listings: Bulkhead
    idle_timeout_s: float
    op_timeout_s: float
    min_rate_bps: int = 0
    send_timeout_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> FileLimits:
        caps = Caps(
            {
                "key": settings.max_file_ops_per_key,
                "user": settings.max_file_ops_per_user,
                "vm": settings.max_file_ops_per_vm,
            }
        )
        return cls(
            Bulkhead("upload", caps),
            Bulkhead("download", caps),
            Bulkhead("listing", caps),
            settings.upload_idle_timeout_s,
            settings.file_op_timeout_s,
            settings.upload_min_rate_bps,
            settings.download_send_timeout_s,
        )


_LIMITS: dict[Settings, FileLimits] = {}


def limits_of(settings: Settings) -> FileLimits:
    """The file bulkheads of the server running with ``settings`` (made on first use)."""
    if settings not in _LIMITS:
        _LIMITS[settings] = FileLimits.from_settings(settings)
    return _LIMITS[settings]


def file_error(exc: FileError | OSError, path: str = "") -> CorralError:
    if isinstance(exc, OSError):
        exc = translate(exc, path)
    if exc.kind == "not_found":
        return NotFound(str(exc), code="file_not_found")
    if exc.kind == "not_running":
        return Conflict("VM is not running", code="vm_not_running")
    if exc.kind == "disk_full":
        return DiskFull(str(exc))
    if exc.kind == "busy":
        return TemporarilyUnavailable(str(exc), retry_after=1)
    if exc.kind in ("is_a_directory", "not_a_directory", "exists"):
        return Conflict(str(exc), code=exc.kind)
    return BadRequest(str(exc), code="invalid_path")


def _files(life: Lifecycle, user_id: str, vm_id: str) -> SandboxFiles:
    cid = life.running_container(user_id, vm_id)
    try:
        return life.node.files(cid)
    except NodeError:
        raise Conflict("VM is not running", code="vm_not_running") from None


async def _session(life: Lifecycle, user_id: str, vm_id: str, limits: FileLimits) -> AsyncSession:
    files = await run_in_threadpool(_files, life, user_id, vm_id)
    try:
        return await AsyncSession.start(files, limits.op_timeout_s)
    except FileError as exc:
        raise file_error(exc) from None


def _mode(raw: str) -> int:
    if not raw or len(raw) > 5 or any(c not in "01234567" for c in raw):
        raise InvalidParameter("mode must be octal permission bits, like 0644")
    return int(raw, 8)


def _scopes(key_id: str, user_id: str, vm_id: str) -> list[SlotScope]:
    return [("key", key_id), ("user", user_id), ("vm", vm_id)]


class _Slot:
    """A bulkhead slot held until ``release`` (idempotent: a stream's end and its error path both call it)."""

    def __init__(self, bulkhead: Bulkhead, scopes: Sequence[SlotScope]) -> None:
        bulkhead.acquire(scopes)
        self._bulkhead, self._scopes, self._held = bulkhead, scopes, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._bulkhead.release(self._scopes)


async def _body(request: Request, idle_s: float, min_rate_bps: int = 0) -> AsyncIterator[bytes]:
    """The request body, failing with 408 when nothing arrives for ``idle_s`` seconds, or when a window of
    ``idle_s`` seconds brings less than ``min_rate_bps`` bytes a second (a body trickled in to hold a worker
    and a slot for ever)."""
    stream = request.stream().__aiter__()
    loop = asyncio.get_running_loop()
    need = max(1, int(min_rate_bps * idle_s))
    window_end = last = loop.time()
    window_end += idle_s
    got = 0
    pending: asyncio.Task[bytes] | None = None  # never cancelled at a window's end: that would end the body
    try:
        while True:
            now = loop.time()
            if now >= window_end:
                if got < need:
                    raise RequestTimeout(
                        f"the upload sent less than {min_rate_bps} bytes a second over {idle_s:g} s; "
                        "nothing was kept"
                    )
                window_end, got = now + idle_s, 0
            if pending is None:
                pending = asyncio.ensure_future(_next(stream))
            finished, _ = await asyncio.wait(
                {pending}, timeout=max(0.0, min(last + idle_s, window_end) - now)
            )
            if not finished:
                if loop.time() >= last + idle_s:
                    raise RequestTimeout(f"the upload sent nothing for {idle_s:g} s; nothing was kept")
                continue  # the window's end: its rate is checked above
            task, pending = pending, None
            try:
                chunk = task.result()
            except StopAsyncIteration:
                return
            if chunk:
                last = loop.time()
                got += len(chunk)
                yield chunk
    finally:
        if pending is not None:
            pending.cancel()


async def _next(stream: AsyncIterator[bytes]) -> bytes:
    return await anext(stream)


@router.post(
    "/{vm_id}/files/upload",
    response_model=UploadOut,
    status_code=201,
    summary="Upload a file",
    description="The raw request body becomes the file at `path` (any size, streamed; replaced if it exists, "
    "atomically). `mode` sets its permissions (default 0644); missing parent directories are created unless "
    "`parents=false`. Paths resolve inside the sandbox's root: `..` and symlinks never leave it, and the "
    "write is made with the sandbox root's own rights (no kernel files, no device nodes). A write past "
    "the VM's `disk_mib` answers 507 `disk_full` and leaves no partial file; a body that sends nothing for "
    "`CORRAL_UPLOAD_IDLE_TIMEOUT_S` (30 s), or less than `CORRAL_UPLOAD_MIN_RATE_BPS` (4096) bytes a second "
    "over such a window, answers 408 `request_timeout` and leaves none either.",
    responses=errors(*AUTHED, 404, 408, 409, 503, 507),
)
async def upload_file(
    vm_id: VmId,
    request: Request,
    who: PrincipalDep,
    st: StateDep,
    path: FilePath,
    mode: Annotated[str, Query(description="Octal permissions")] = "0644",
    parents: Annotated[bool, Query(description="Create missing parent directories")] = True,
) -> UploadOut:
    life = lifecycle_of(st)
    limits = limits_of(st.settings)
    bits = _mode(mode)
    try:
        target = normalise(path)
    except FileError as exc:
        raise file_error(exc) from None
    slot = _Slot(limits.uploads, _scopes(who.key_id, who.user_id, vm_id))
    try:
        session = await _session(life, who.user_id, vm_id, limits)
        try:
            reply, _ = await session.call({"op": "put", "path": target, "mode": bits, "parents": parents})
            handle = int(reply["h"])
            batch = bytearray()
            async for chunk in _body(request, limits.idle_timeout_s, limits.min_rate_bps):
                batch += chunk
                if len(batch) >= WRITE_BATCH:
                    await session.call({"op": "write", "h": handle, "offset": -1}, bytes(batch))
                    batch.clear()
            if batch:
                await session.call({"op": "write", "h": handle, "offset": -1}, bytes(batch))
            reply, _ = await session.call({"op": "commit", "h": handle})
        except (FileError, OSError) as exc:
            raise file_error(exc, target) from None
        finally:
            session.close()  # an upload not committed is removed by the worker as it ends
    finally:
        slot.release()
    return UploadOut(path=target, size=int(reply["size"]))


@router.get(
    "/{vm_id}/files/download",
    summary="Download a file",
    description="Streams the regular file at `path`, read with the sandbox root's own rights: kernel files "
    "(`/proc`, `/sys`) and device nodes are refused (400 `invalid_path`). A client that reads nothing for "
    "`CORRAL_DOWNLOAD_SEND_TIMEOUT_S` (60 s) has its connection ended.",
    responses={200: {"content": {"application/octet-stream": {}}}, **errors(*AUTHED, 404, 409, 503)},
)
async def download_file(vm_id: VmId, who: PrincipalDep, st: StateDep, path: FilePath) -> StreamingResponse:
    life = lifecycle_of(st)
    limits = limits_of(st.settings)
    try:
        target = normalise(path)
    except FileError as exc:
        raise file_error(exc) from None
    slot = _Slot(limits.downloads, _scopes(who.key_id, who.user_id, vm_id))
    try:
        session = await _session(life, who.user_id, vm_id, limits)
    except BaseException:
        slot.release()
        raise
    try:
        reply, _ = await _open_read(session, target)
    except BaseException:
        session.close()
        slot.release()
        raise
    handle, size = int(reply["h"]), int(reply["size"])

    async def chunks() -> AsyncIterator[bytes]:
        left = size or -1  # a size of 0 is unknown: read to the end
        try:
            while left != 0:
                want = CHUNK if left < 0 else min(CHUNK, left)
                _, data = await session.call({"op": "read", "h": handle, "offset": -1, "size": want})
                if not data:
                    return
                if left > 0:
                    left -= len(data)
                yield data
        finally:
            done()

    def done() -> None:
        session.close()
        slot.release()

    name = target.rsplit("/", 1)[-1] or "file"
    headers = {"Content-Disposition": f'attachment; filename="{_safe(name)}"'}
    if size:
        headers["Content-Length"] = str(size)
    return _Download(
        chunks(),
        done,
        send_timeout_s=limits.send_timeout_s,
        media_type="application/octet-stream",
        headers=headers,
    )


class _Stalled(Exception):
    """The client read nothing of a download for the send timeout."""


class _Download(StreamingResponse):
    """A streamed download whose worker and slot are given back however the response ends (a client that
    leaves before the first chunk never runs the stream's own cleanup), and ended when its client reads
    nothing for ``send_timeout_s`` (a stalled reader would hold the worker and the slot for ever)."""

    def __init__(
        self, content: AsyncIterator[bytes], done: Callable[[], None], *, send_timeout_s: float, **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._done = done
        self._send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def timed(message: Message) -> None:
            try:
                async with asyncio.timeout(self._send_timeout_s):
                    await send(message)
            except TimeoutError:
                raise _Stalled from None

        try:
            await super().__call__(scope, receive, timed)
        except _Stalled:
            log.info("a download's client read nothing for %g s: ended", self._send_timeout_s)
        finally:
            self._done()


async def _open_read(session: AsyncSession, target: str) -> tuple[dict[str, Any], bytes]:
    try:
        return await session.call({"op": "open_read", "path": target})
    except (FileError, OSError) as exc:
        raise file_error(exc, target) from None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:200]


def encode_list_cursor(path: str, name: bytes) -> str:
    """Opaque: the directory and the last name of the page (names are bytes: ordered as the kernel's)."""
    raw = json.dumps(["files", path, name.hex()], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_list_cursor(cursor: str, path: str) -> bytes:
    if len(cursor) > 12_000:
        raise InvalidCursor("cursor is malformed")
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        match raw:
            case ["files", str(where), str(name)]:
                after = bytes.fromhex(name)
            case _:
                raise InvalidCursor("cursor is malformed")
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidCursor("cursor is malformed") from None
    if where != path:
        raise InvalidCursor(f"cursor was issued for path={where}; pass the same path as the first page")
    return after


@router.get(
    "/{vm_id}/files",
    response_model=FileListOut,
    summary="List a directory",
    description="Entries of the directory at `path`, by name (byte order): `type` file/directory/symlink/other, "
    f"`size`, `mode` (octal) and `mtime`. Paged: `limit` entries (default {LIST_DEFAULT}, at most {LIST_MAX}); "
    "while `has_more`, pass `cursor` back (with the same `path`) for the next page. Entries added or removed "
    "between pages are never repeated; a name is either on one page or gone.",
    responses=errors(*AUTHED, 404, 409, 503),
)
async def list_files(
    vm_id: VmId,
    who: PrincipalDep,
    st: StateDep,
    path: FilePath = "/",
    limit: Annotated[int | None, Query(description=f"1-{LIST_MAX}, default {LIST_DEFAULT}")] = None,
    cursor: Annotated[str | None, Query(description="From the previous page")] = None,
) -> FileListOut:
    life = lifecycle_of(st)
    limits = limits_of(st.settings)
    size = LIST_DEFAULT if limit is None else limit
    if not 1 <= size <= LIST_MAX:
        raise InvalidParameter(f"limit must be between 1 and {LIST_MAX}")
    try:
        where = normalise(path)
    except FileError as exc:
        raise file_error(exc) from None
    after = decode_list_cursor(cursor, where) if cursor is not None else None
    slot = _Slot(limits.listings, _scopes(who.key_id, who.user_id, vm_id))
    try:
        session = await _session(life, who.user_id, vm_id, limits)
        try:
            request: dict[str, Any] = {"op": "list", "path": where, "limit": size}
            if after is not None:
                request["after"] = after.hex()
            reply, _ = await session.call(request)
        except (FileError, OSError) as exc:
            raise file_error(exc, where) from None
        finally:
            session.close()
    finally:
        slot.release()
    entries = [
        FileEntryOut(
            name=bytes.fromhex(name).decode(errors="surrogateescape"),
            type=kind,
            size=length,
            mode=bits,
            mtime=datetime.fromtimestamp(mtime, UTC),
        )
        for name, kind, length, bits, mtime in reply["entries"]
    ]
    following = reply.get("next")
    return FileListOut(
        path=where,
        data=entries,
        has_more=following is not None,
        cursor=encode_list_cursor(where, bytes.fromhex(following)) if following is not None else None,
    )
