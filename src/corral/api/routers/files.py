"""Moving files in and out of a VM: ``/v1/vms/{vm_id}/files`` (isorun's paths)."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from corral.api.deps import PrincipalDep, StateDep
from corral.api.routers.common import AUTHED, errors
from corral.api.routers.vms import lifecycle_of
from corral.api.schemas import FileEntryOut, FileListOut, UploadOut
from corral.domain.errors import BadRequest, Conflict, CorralError, InvalidParameter, NotFound
from corral.node.files import FileError, SandboxFiles, normalise
from corral.node.local import NodeError
from corral.services.lifecycle import Lifecycle

router = APIRouter(prefix="/v1/vms", tags=["exec and files"])
VmId = Annotated[str, Path(description="The VM ID")]
FilePath = Annotated[str, Query(description="Absolute path inside the sandbox", max_length=4096)]


class UploadAborted(Exception):
    pass


class DiskFull(CorralError):
    status = 507
    code = "disk_full"


def file_error(exc: FileError) -> CorralError:
    if exc.kind == "not_found":
        return NotFound(str(exc), code="file_not_found")
    if exc.kind == "not_running":
        return Conflict("VM is not running", code="vm_not_running")
    if exc.kind == "disk_full":
        return DiskFull(str(exc))
    if exc.kind in ("is_a_directory", "not_a_directory", "exists"):
        return Conflict(str(exc), code=exc.kind)
    return BadRequest(str(exc), code="invalid_path")


def _files(life: Lifecycle, user_id: str, vm_id: str) -> SandboxFiles:
    cid = life.running_container(user_id, vm_id)
    try:
        return life.node.files(cid)
    except NodeError:
        raise Conflict("VM is not running", code="vm_not_running") from None


def _mode(raw: str) -> int:
    if not raw or len(raw) > 5 or any(c not in "01234567" for c in raw):
        raise InvalidParameter("mode must be octal permission bits, like 0644")
    return int(raw, 8)


@router.post(
    "/{vm_id}/files/upload",
    response_model=UploadOut,
    status_code=201,
    summary="Upload a file",
    description="The raw request body becomes the file at `path` (any size, streamed; replaced if it exists, "
    "atomically). `mode` sets its permissions (default 0644); missing parent directories are created unless "
    "`parents=false`. Paths resolve inside the sandbox's root: `..` and symlinks never leave it. A write past "
    "the VM's `disk_mib` answers 507 `disk_full` and leaves no partial file.",
    responses=errors(*AUTHED, 404, 409),
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
    bits = _mode(mode)
    try:
        target = normalise(path)
    except FileError as exc:
        raise file_error(exc) from None
    files = await run_in_threadpool(_files, life, who.user_id, vm_id)
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=16)

    def feed() -> Iterator[bytes]:
        while (chunk := chunks.get()) is not None:
            if isinstance(chunk, BaseException):
                raise UploadAborted from chunk  # the client went away: no partial file is kept
            yield chunk

    async def put(item: bytes | BaseException | None) -> None:
        while not writer.done():
            try:
                chunks.put_nowait(item)
                return
            except queue.Full:
                await asyncio.sleep(0.001)

    loop = asyncio.get_running_loop()
    writer = loop.run_in_executor(None, lambda: files.write(target, feed(), mode=bits, parents=parents))
    try:
        async for chunk in request.stream():
            if chunk:
                await put(chunk)
            if writer.done():
                break
    except BaseException as exc:
        await put(exc)
        raise
    await put(None)
    try:
        size = await writer
    except FileError as exc:
        raise file_error(exc) from None
    return UploadOut(path=target, size=size)


@router.get(
    "/{vm_id}/files/download",
    summary="Download a file",
    description="Streams the regular file at `path`.",
    responses={200: {"content": {"application/octet-stream": {}}}, **errors(*AUTHED, 404, 409)},
)
def download_file(vm_id: VmId, who: PrincipalDep, st: StateDep, path: FilePath) -> StreamingResponse:
    life = lifecycle_of(st)
    files = _files(life, who.user_id, vm_id)
    try:
        size, chunks = files.read(path)
    except FileError as exc:
        raise file_error(exc) from None
    name = normalise(path).rsplit("/", 1)[-1] or "file"
    headers = {"Content-Disposition": f'attachment; filename="{_safe(name)}"'}
    if size:  # /proc-like files report 0: sent chunked instead
        headers["Content-Length"] = str(size)
    return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:200]


@router.get(
    "/{vm_id}/files",
    response_model=FileListOut,
    summary="List a directory",
    description="Entries of the directory at `path`, by name: `type` file/directory/symlink/other, `size`, "
    "`mode` (octal) and `mtime`.",
    responses=errors(*AUTHED, 404, 409),
)
def list_files(vm_id: VmId, who: PrincipalDep, st: StateDep, path: FilePath = "/") -> FileListOut:
    life = lifecycle_of(st)
    files = _files(life, who.user_id, vm_id)
    try:
        entries = files.list(path)
    except FileError as exc:
        raise file_error(exc) from None
    return FileListOut(
        path=normalise(path),
        data=[
            FileEntryOut(name=e.name, type=e.type, size=e.size, mode=e.mode, mtime=e.mtime) for e in entries
        ],
    )
