"""Sandbox state: snapshots, hibernate and resume, fork, checkpoints and rollback."""

from __future__ import annotations

from corral.sdk.call import Call, Route, body, data, data_list, model, nothing, page, params
from corral.sdk.models import Checkpoint, Page, Snapshot, Vm

CREATE_SNAPSHOT = Route("POST", "/v1/vms/{vm_id}/snapshots")
LIST_VM_SNAPSHOTS = Route("GET", "/v1/vms/{vm_id}/snapshots")
LIST_SNAPSHOTS = Route("GET", "/v1/snapshots")
GET_SNAPSHOT = Route("GET", "/v1/snapshots/{snapshot_id}")
DELETE_SNAPSHOT = Route("DELETE", "/v1/snapshots/{snapshot_id}")
HIBERNATE = Route("POST", "/v1/vms/{vm_id}/hibernate")
RESUME = Route("POST", "/v1/vms/{vm_id}/resume")
FORK = Route("POST", "/v1/vms/{vm_id}/fork")
CREATE_CHECKPOINT = Route("POST", "/v1/vms/{vm_id}/checkpoints")
LIST_CHECKPOINTS = Route("GET", "/v1/vms/{vm_id}/checkpoints")
GET_CHECKPOINT = Route("GET", "/v1/vms/{vm_id}/checkpoints/{checkpoint_id}")
DELETE_CHECKPOINT = Route("DELETE", "/v1/vms/{vm_id}/checkpoints/{checkpoint_id}")
ROLLBACK = Route("POST", "/v1/vms/{vm_id}/rollback")


def create_snapshot(vm_id: str, *, label: str | None = None, disk_only: bool | None = None) -> Call[Snapshot]:
    """Snapshot a running VM; it answers ``pending`` at once (see ``snapshots.wait_ready``)."""
    json = body(label=label, disk_only=disk_only)
    return Call(CREATE_SNAPSHOT, data(Snapshot), path_values={"vm_id": vm_id}, json=json)


def list_snapshots(*, limit: int | None = None, cursor: str | None = None) -> Call[Page[Snapshot]]:
    """Your snapshots, newest first."""
    return Call(LIST_SNAPSHOTS, page(Snapshot), params=params(limit=limit, cursor=cursor))


def list_vm_snapshots(
    vm_id: str, *, limit: int | None = None, cursor: str | None = None
) -> Call[Page[Snapshot]]:
    """The snapshots taken of one VM, newest first."""
    q = params(limit=limit, cursor=cursor)
    return Call(LIST_VM_SNAPSHOTS, page(Snapshot), path_values={"vm_id": vm_id}, params=q)


def get_snapshot(snapshot_id: str) -> Call[Snapshot]:
    return Call(GET_SNAPSHOT, data(Snapshot), path_values={"snapshot_id": snapshot_id})


def delete_snapshot(snapshot_id: str) -> Call[None]:
    return Call(DELETE_SNAPSHOT, nothing, path_values={"snapshot_id": snapshot_id})


def hibernate(vm_id: str) -> Call[Vm]:
    """Save the VM's memory and processes and free its CPU and memory (``hibernated``)."""
    return Call(HIBERNATE, model(Vm), path_values={"vm_id": vm_id})


def resume(vm_id: str) -> Call[Vm]:
    """Bring a hibernated VM back with its processes as they were."""
    return Call(RESUME, model(Vm), path_values={"vm_id": vm_id})


def fork(vm_id: str, count: int | None = None) -> Call[list[Vm]]:
    """``count`` (1 to 16) new running VMs with the source's disk and memory at one instant."""
    return Call(FORK, data_list(Vm), path_values={"vm_id": vm_id}, json=body(count=count))


def create_checkpoint(vm_id: str, name: str, *, disk_only: bool | None = None) -> Call[Checkpoint]:
    """A named restore point of a running VM."""
    json = body(name=name, disk_only=disk_only)
    return Call(CREATE_CHECKPOINT, data(Checkpoint), path_values={"vm_id": vm_id}, json=json)


def list_checkpoints(
    vm_id: str, *, limit: int | None = None, cursor: str | None = None
) -> Call[Page[Checkpoint]]:
    q = params(limit=limit, cursor=cursor)
    return Call(LIST_CHECKPOINTS, page(Checkpoint), path_values={"vm_id": vm_id}, params=q)


def get_checkpoint(vm_id: str, checkpoint_id: str) -> Call[Checkpoint]:
    path = {"vm_id": vm_id, "checkpoint_id": checkpoint_id}
    return Call(GET_CHECKPOINT, data(Checkpoint), path_values=path)


def delete_checkpoint(vm_id: str, checkpoint_id: str) -> Call[None]:
    path = {"vm_id": vm_id, "checkpoint_id": checkpoint_id}
    return Call(DELETE_CHECKPOINT, nothing, path_values=path)


def rollback(vm_id: str, checkpoint_id: str) -> Call[Vm]:
    """Put the VM back as it was at the checkpoint (the checkpoint stays)."""
    return Call(ROLLBACK, model(Vm), path_values={"vm_id": vm_id}, json={"checkpoint_id": checkpoint_id})
