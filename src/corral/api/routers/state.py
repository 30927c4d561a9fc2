"""Sandbox state: snapshots (``/v1/snapshots``, ``/v1/vms/{id}/snapshots``, the iron.sh reference), hibernate,
resume and fork (isorun), checkpoints and rollback (the instances platform)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from starlette.concurrency import run_in_threadpool

from corral.api.deps import PrincipalDep, StateDep
from corral.api.routers.common import AUTHED, Cursor, Limit, errors
from corral.api.routers.vms import VmId, vm_out
from corral.api.schemas import (
    CheckpointCreateRequest,
    CheckpointOut,
    DataEnvelope,
    ForkRequest,
    ListEnvelope,
    RollbackRequest,
    SnapshotCreateRequest,
    SnapshotOut,
    VmOut,
)
from corral.domain.pagination import page_request
from corral.services.lifecycle import NodeUnavailable
from corral.services.state import CHECKPOINT_LIST, SNAPSHOT_LIST, StateService
from corral.store.tables import Checkpoint, Snapshot

router = APIRouter(tags=["state"])
SnapshotId = Annotated[str, Path(description="The snapshot ID, e.g. snap_abc123")]
CheckpointId = Annotated[str, Path(description="The checkpoint ID, e.g. ckpt_k3mf9xvw2p")]


def saved_of(st: StateDep) -> StateService:
    if st.saved_state is None:
        raise NodeUnavailable("This server runs no sandboxes (CORRAL_NODE=off)")
    return st.saved_state


def snapshot_out(row: Snapshot) -> SnapshotOut:
    return SnapshotOut.model_validate(
        {
            "id": row.id,
            "source_virtual_machine_id": row.source_vm_id,
            "source_base_image": row.source_base_image,
            "source_snapshot_id": row.source_snapshot_id,
            "label": row.label,
            "status": row.status,
            "r2_key": row.storage_key,
            "size_bytes": row.size_bytes,
            "created_at": row.created_at,
            "memory": row.memory,
            "failure_reason": row.failure_reason if row.status == "failed" else None,
        }
    )


def checkpoint_out(row: Checkpoint) -> CheckpointOut:
    return CheckpointOut.model_validate(row)


# ---- snapshots ------------------------------------------------------------------------------------------------


@router.post(
    "/v1/vms/{vm_id}/snapshots",
    status_code=201,
    response_model=DataEnvelope[SnapshotOut],
    summary="Create a snapshot",
    description="Snapshots a running or ready VM: its disk as a new immutable layer and, unless `disk_only`, its "
    "memory and processes. Answers at once with `pending`; the status moves to `uploading`, then `ready` (or "
    "`failed`) in the background while the VM keeps running (it pauses for the instant of the capture). Boot a "
    "new VM from it with `snapshot_id` on POST /v1/vms.",
    responses=errors(*AUTHED, 404, 409, 422),
)
async def create_snapshot(
    vm_id: VmId, who: PrincipalDep, st: StateDep, body: SnapshotCreateRequest | None = None
) -> DataEnvelope[SnapshotOut]:
    saved = saved_of(st)
    body = body or SnapshotCreateRequest()
    row = await run_in_threadpool(
        saved.create_snapshot, who.user_id, vm_id, body.label, memory=not body.disk_only
    )
    return DataEnvelope[SnapshotOut](data=snapshot_out(row))


def _list_snapshots(
    who: PrincipalDep, st: StateDep, cursor: str | None, limit: int | None, vm_id: str | None
) -> ListEnvelope[SnapshotOut]:
    saved = saved_of(st)
    request = page_request(SNAPSHOT_LIST, limit=limit, cursor=cursor)
    with (st.reads or st.sessions)() as session:
        page = saved.list_snapshots(session, who.user_id, request, vm_id)
        data = [snapshot_out(r) for r in page.data]
    return ListEnvelope[SnapshotOut](data=data, has_more=page.has_more, cursor=page.cursor)


@router.get(
    "/v1/snapshots",
    response_model=ListEnvelope[SnapshotOut],
    summary="List snapshots",
    description="Your snapshots, newest first. `limit` defaults to 20, at most 100.",
    responses=errors(*AUTHED),
)
def list_snapshots(
    who: PrincipalDep, st: StateDep, cursor: Cursor = None, limit: Limit = None
) -> ListEnvelope[SnapshotOut]:
    return _list_snapshots(who, st, cursor, limit, None)


@router.get(
    "/v1/vms/{vm_id}/snapshots",
    response_model=ListEnvelope[SnapshotOut],
    summary="List a VM's snapshots",
    description="The snapshots taken of one VM, newest first.",
    responses=errors(*AUTHED, 404),
)
def list_vm_snapshots(
    vm_id: VmId, who: PrincipalDep, st: StateDep, cursor: Cursor = None, limit: Limit = None
) -> ListEnvelope[SnapshotOut]:
    return _list_snapshots(who, st, cursor, limit, vm_id)


@router.get(
    "/v1/snapshots/{snapshot_id}",
    response_model=DataEnvelope[SnapshotOut],
    summary="Get a snapshot",
    responses=errors(*AUTHED, 404),
)
def get_snapshot(snapshot_id: SnapshotId, who: PrincipalDep, st: StateDep) -> DataEnvelope[SnapshotOut]:
    saved = saved_of(st)
    with (st.reads or st.sessions)() as session:
        return DataEnvelope[SnapshotOut](
            data=snapshot_out(saved.get_snapshot(session, who.user_id, snapshot_id))
        )


@router.delete(
    "/v1/snapshots/{snapshot_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a snapshot",
    description="Soft-deletes a snapshot: it no longer appears in list or get responses, and its stored data is "
    "removed. VMs booted from it are not affected.",
    responses=errors(*AUTHED, 404),
)
async def delete_snapshot(snapshot_id: SnapshotId, who: PrincipalDep, st: StateDep) -> Response:
    await run_in_threadpool(saved_of(st).delete_snapshot, who.user_id, snapshot_id)
    return Response(status_code=204)


# ---- hibernate, resume, fork ----------------------------------------------------------------------------------


@router.post(
    "/v1/vms/{vm_id}/hibernate",
    response_model=VmOut,
    summary="Hibernate a VM",
    description="Saves the VM's memory and processes (its disk stays) and frees its CPU and memory: `stopped` / "
    "`hibernated`. Resume brings it back with its processes as they were. Open network connections are not kept.",
    responses=errors(*AUTHED, 404, 409, 500),
)
async def hibernate_vm(vm_id: VmId, who: PrincipalDep, st: StateDep) -> VmOut:
    return vm_out(await run_in_threadpool(saved_of(st).hibernate, who.user_id, vm_id))


@router.post(
    "/v1/vms/{vm_id}/resume",
    response_model=VmOut,
    summary="Resume a hibernated VM",
    description="Restores the processes and memory of a `hibernated` VM. Returns the VM, `running` / `ready`.",
    responses=errors(*AUTHED, 404, 409, 500),
)
async def resume_vm(vm_id: VmId, who: PrincipalDep, st: StateDep) -> VmOut:
    return vm_out(await run_in_threadpool(saved_of(st).resume, who.user_id, vm_id))


@router.post(
    "/v1/vms/{vm_id}/fork",
    status_code=201,
    response_model=DataEnvelope[list[VmOut]],
    summary="Fork a running VM",
    description="Makes `count` new running VMs (1 to 16) with the source's disk and memory at one instant; the "
    "source keeps running. Each child has its own ID, name (`<source name>-fork-<id>`), hostname and network "
    "address; unchanged disk blocks are shared, not copied. The children are admitted like creates: 409 "
    "`quota_exceeded`, 503 `node_full`.",
    responses=errors(*AUTHED, 404, 409, 422, 500, 503),
)
async def fork_vm(
    vm_id: VmId, who: PrincipalDep, st: StateDep, body: ForkRequest | None = None
) -> DataEnvelope[list[VmOut]]:
    body = body or ForkRequest()
    rows = await run_in_threadpool(saved_of(st).fork, who.user_id, vm_id, body.count)
    return DataEnvelope[list[VmOut]](data=[vm_out(r) for r in rows])


# ---- checkpoints ----------------------------------------------------------------------------------------------


@router.post(
    "/v1/vms/{vm_id}/checkpoints",
    status_code=201,
    response_model=DataEnvelope[CheckpointOut],
    summary="Create a checkpoint",
    description="A named, local restore point of a running VM: its disk and (unless `disk_only`) its memory and "
    "processes. Roll back to it with POST /v1/vms/{vm_id}/rollback.",
    responses=errors(*AUTHED, 404, 409, 422, 500),
)
async def create_checkpoint(
    vm_id: VmId, body: CheckpointCreateRequest, who: PrincipalDep, st: StateDep
) -> DataEnvelope[CheckpointOut]:
    row = await run_in_threadpool(
        saved_of(st).create_checkpoint, who.user_id, vm_id, body.name, memory=not body.disk_only
    )
    return DataEnvelope[CheckpointOut](data=checkpoint_out(row))


@router.get(
    "/v1/vms/{vm_id}/checkpoints",
    response_model=ListEnvelope[CheckpointOut],
    summary="List a VM's checkpoints",
    description="Newest first. `limit` defaults to 20, at most 100.",
    responses=errors(*AUTHED, 404),
)
def list_checkpoints(
    vm_id: VmId, who: PrincipalDep, st: StateDep, cursor: Cursor = None, limit: Limit = None
) -> ListEnvelope[CheckpointOut]:
    saved = saved_of(st)
    request = page_request(CHECKPOINT_LIST, limit=limit, cursor=cursor)
    with (st.reads or st.sessions)() as session:
        page = saved.list_checkpoints(session, who.user_id, vm_id, request)
        data = [checkpoint_out(r) for r in page.data]
    return ListEnvelope[CheckpointOut](data=data, has_more=page.has_more, cursor=page.cursor)


@router.get(
    "/v1/vms/{vm_id}/checkpoints/{checkpoint_id}",
    response_model=DataEnvelope[CheckpointOut],
    summary="Get a checkpoint",
    responses=errors(*AUTHED, 404),
)
def get_checkpoint(
    vm_id: VmId, checkpoint_id: CheckpointId, who: PrincipalDep, st: StateDep
) -> DataEnvelope[CheckpointOut]:
    saved = saved_of(st)
    with (st.reads or st.sessions)() as session:
        row = saved.get_checkpoint(session, who.user_id, vm_id, checkpoint_id)
        return DataEnvelope[CheckpointOut](data=checkpoint_out(row))


@router.delete(
    "/v1/vms/{vm_id}/checkpoints/{checkpoint_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a checkpoint",
    responses=errors(*AUTHED, 404),
)
async def delete_checkpoint(
    vm_id: VmId, checkpoint_id: CheckpointId, who: PrincipalDep, st: StateDep
) -> Response:
    await run_in_threadpool(saved_of(st).delete_checkpoint, who.user_id, vm_id, checkpoint_id)
    return Response(status_code=204)


@router.post(
    "/v1/vms/{vm_id}/rollback",
    response_model=VmOut,
    summary="Roll a VM back to a checkpoint",
    description="Puts the VM's disk and (if the checkpoint has them) its processes back as they were at the "
    "checkpoint; what happened since is discarded. The checkpoint stays. Returns the VM, `running` / `ready`.",
    responses=errors(*AUTHED, 404, 409, 422, 500),
)
async def rollback_vm(vm_id: VmId, body: RollbackRequest, who: PrincipalDep, st: StateDep) -> VmOut:
    return vm_out(await run_in_threadpool(saved_of(st).rollback, who.user_id, vm_id, body.checkpoint_id))
