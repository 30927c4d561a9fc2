"""VMs: ``/v1/vms`` (the iron.sh reference) and images: ``/v1/images``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Response
from starlette.concurrency import run_in_threadpool

from corral.api.deps import PrincipalDep, StateDep
from corral.api.routers.common import AUTHED, Cursor, Limit, SortOrder, errors
from corral.api.schemas import (
    ImageOut,
    ListEnvelope,
    VmCreateRequest,
    VmHistoryOut,
    VmOut,
    VmTimerRequest,
)
from corral.domain.errors import InvalidParameter, NotFound, ValidationFailed
from corral.domain.ids import Prefix, has_prefix
from corral.domain.pagination import page_request
from corral.domain.pricing import cents
from corral.domain.vm_states import Detail, Status, status_of
from corral.services import usage, vms
from corral.services.lifecycle import Lifecycle, NodeUnavailable
from corral.store.tables import Vm

router = APIRouter(prefix="/v1/vms", tags=["vms"])
images_router = APIRouter(prefix="/v1/images", tags=["images"])
VmId = Annotated[str, Path(description="The VM ID, e.g. vm_k3mf9xvw2p")]


def lifecycle_of(st: StateDep) -> Lifecycle:
    if st.lifecycle is None:
        raise NodeUnavailable("This server runs no sandboxes (CORRAL_NODE=off)")
    return st.lifecycle


def vm_out(row: Vm) -> VmOut:
    return VmOut.model_validate(vm_fields(row))


def vm_fields(row: Vm) -> dict[str, object]:
    """The VM object's fields; the usage figures are as of the VM's last cgroup sample."""
    detail = Detail(row.status_detail)
    return {
        "id": row.id,
        "name": row.name,
        "status": status_of(detail).value,
        "status_detail": detail.value,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "image": row.image,
        "vcpus": row.vcpus,
        "mem_mib": row.mem_mib,
        "disk_mib": row.disk_mib,
        "snapshot_id": row.snapshot_id,
        "create_ms": row.create_ms,
        "failure_reason": row.failure_reason if detail is Detail.FAILED else None,
        "egress": None
        if row.egress_mode is None and not row.egress_rules
        else {"mode": row.egress_mode, "rules": vms.egress_rules_of(row)},
        "timeout": row.timeout,
        "expires_at": row.expires_at,
        "cpu_ms": row.cpu_us // 1000,
        "mem_peak_bytes": row.mem_peak_bytes,
        "uptime_ms": row.uptime_ms,
        "destroy_reason": row.destroy_reason if detail is Detail.DESTROYED else None,
        "destroyed_at": row.destroyed_at if detail is Detail.DESTROYED else None,
    }


@router.post(
    "",
    status_code=201,
    response_model=VmOut,
    summary="Create a VM",
    description="Answers at once with `pending`/`queued`; poll GET /v1/vms/{vm_id} until `running`/`ready`. "
    "A VM with the default image and resources is handed over from the warm pool (a few ms); others boot cold. "
    "Admitted against the account's quotas (409 `quota_exceeded`: VMs, vCPUs, memory, disk of the VMs that are "
    "not destroyed) and the node's capacity (503 `node_full`); each message says which limit and what is in use.",
    responses=errors(*AUTHED, 404, 409, 422, 503),
)
def create_vm(body: VmCreateRequest, who: PrincipalDep, st: StateDep) -> VmOut:
    life = lifecycle_of(st)
    image, vcpus, mem_mib, disk_mib = (
        body.image or life.default_image,
        body.vcpus,
        body.mem_mib,
        body.disk_mib,
    )
    if body.snapshot_id is not None:
        # the snapshot decides the image and, unless given, the resources; its disk must fit
        if st.saved_state is None:
            raise NotFound(f"No snapshot with ID {body.snapshot_id}", code="snapshot_not_found")
        with (st.reads or st.sessions)() as session:
            snap = st.saved_state.check_restorable(session, who.user_id, body.snapshot_id)
        if body.image is not None and body.image != snap.image:
            raise ValidationFailed(f"image must be the snapshot's ({snap.image}) or left out")
        if disk_mib is not None and disk_mib < snap.disk_mib:
            raise ValidationFailed(f"disk_mib must be at least the snapshot's ({snap.disk_mib})")
        image, vcpus = snap.image, vcpus or snap.vcpus
        mem_mib, disk_mib = mem_mib or snap.mem_mib, disk_mib or snap.disk_mib
    new = vms.validate_new(
        vms.NewVm(
            name=body.name,
            public_key=body.public_key,
            image=image,
            vcpus=vcpus,
            mem_mib=mem_mib,
            disk_mib=disk_mib,
            snapshot_id=body.snapshot_id,
            egress_mode=body.egress.mode if body.egress else None,
            egress_rules=tuple((r.host, r.cidr) for r in body.egress.rules) if body.egress else None,
            timeout=body.timeout,
        ),
        life.limits,
    )
    return vm_out(life.create(who.user_id, new))


def _enum[E: (Status, Detail)](kind: type[E], name: str, raw: str | None) -> E | None:
    if raw is None:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise InvalidParameter(f"{name} must be one of: {', '.join(m.value for m in kind)}") from None


@router.get(
    "",
    response_model=ListEnvelope[VmOut],
    summary="List VMs",
    description="Newest first by default. `limit` defaults to 20, at most 100.",
    responses=errors(*AUTHED),
)
def list_vms(
    who: PrincipalDep,
    st: StateDep,
    status: Annotated[str | None, Query(description="pending, running, stopped, destroyed, failed")] = None,
    status_detail: Annotated[
        str | None,
        Query(
            description="queued, creating, starting, running, ready, stopping, stopped, destroying, destroyed, failed"
        ),
    ] = None,
    name: Annotated[str | None, Query(description="Exact name")] = None,
    cursor: Cursor = None,
    limit: Limit = None,
    sort: Annotated[str | None, Query(description="created_at, updated_at or name")] = None,
    order: SortOrder = None,
) -> ListEnvelope[VmOut]:
    request = page_request(vms.LIST, limit=limit, cursor=cursor, sort=sort, order=order)
    with (st.reads or st.sessions)() as session:
        page = vms.list_vms(
            session,
            who.user_id,
            request,
            status=_enum(Status, "status", status),
            detail=_enum(Detail, "status_detail", status_detail),
            name=name,
        )
        data = [vm_out(row) for row in page.data]
    return ListEnvelope[VmOut](data=data, has_more=page.has_more, cursor=page.cursor)


@router.get(
    "/history",
    response_model=ListEnvelope[VmHistoryOut],
    summary="List destroyed VMs",
    description="Your destroyed VMs, most recently destroyed first (`sort`: destroyed_at or created_at), "
    "each with what it used (`cpu_ms`, `mem_peak_bytes`, `uptime_ms`), what it cost (`cost_cents`, from "
    "the price table: see GET /v1/usage) and why it ended (`destroy_reason`). `limit` defaults to 20, at "
    "most 100.",
    responses=errors(*AUTHED),
)
def list_history(
    who: PrincipalDep,
    st: StateDep,
    cursor: Cursor = None,
    limit: Limit = None,
    sort: Annotated[str | None, Query(description="destroyed_at or created_at")] = None,
    order: SortOrder = None,
) -> ListEnvelope[VmHistoryOut]:
    request = page_request(usage.HISTORY, limit=limit, cursor=cursor, sort=sort, order=order)
    now = st.services.clock.now()
    with (st.reads or st.sessions)() as session:
        page = usage.list_history(session, who.user_id, request)
        costs = usage.lifetime_costs(session, who.user_id, page.data, st.settings.prices, now)
        data = [
            VmHistoryOut.model_validate({**vm_fields(row), "cost_cents": cents(costs[row.id])})
            for row in page.data
        ]
    return ListEnvelope[VmHistoryOut](data=data, has_more=page.has_more, cursor=page.cursor)


@router.get("/{vm_id}", response_model=VmOut, summary="Get a VM", responses=errors(*AUTHED, 404))
def get_vm(vm_id: VmId, who: PrincipalDep, st: StateDep) -> VmOut:
    with (st.reads or st.sessions)() as session:
        return vm_out(vms.get_vm(session, who.user_id, vm_id))


@router.patch(
    "/{vm_id}",
    response_model=VmOut,
    summary="Reset the auto-destroy timer",
    description="Sets `expires_at` to now plus `timeout` seconds (kept as the VM's new timeout), or plus "
    "the VM's own timeout when the body or its `timeout` is left out. A VM without a timer needs "
    "`timeout` (400 `vm_has_no_timeout`); a destroyed VM answers 409 `vm_destroyed`.",
    responses=errors(*AUTHED, 404, 409, 422),
)
async def reset_timer(
    vm_id: VmId,
    who: PrincipalDep,
    st: StateDep,
    body: Annotated[VmTimerRequest | None, Body()] = None,
) -> VmOut:
    life = lifecycle_of(st)
    row = await run_in_threadpool(life.reset_timer, who.user_id, vm_id, body.timeout if body else None)
    return vm_out(row)


@router.delete(
    "/{vm_id}",
    status_code=204,
    response_class=Response,
    summary="Destroy a VM",
    description="The VM must be stopped (or failed). Removes its sandbox, mounts, cgroups and disk; the record "
    "stays as `destroyed`.",
    responses=errors(*AUTHED, 404, 409),
)
async def destroy_vm(vm_id: VmId, who: PrincipalDep, st: StateDep) -> Response:
    life = lifecycle_of(st)
    await run_in_threadpool(life.destroy, who.user_id, vm_id)
    return Response(status_code=204)


@router.post(
    "/{vm_id}/start",
    response_model=VmOut,
    summary="Start a VM",
    description="Boots a stopped VM again from its disk. Returns the VM, `running`.",
    responses=errors(*AUTHED, 404, 409),
)
async def start_vm(vm_id: VmId, who: PrincipalDep, st: StateDep) -> VmOut:
    life = lifecycle_of(st)
    return vm_out(await run_in_threadpool(life.start, who.user_id, vm_id))


@router.post(
    "/{vm_id}/stop",
    response_model=VmOut,
    summary="Stop a VM",
    description="Kills every process and keeps the disk. Returns the VM, `stopped`.",
    responses=errors(*AUTHED, 404, 409),
)
async def stop_vm(vm_id: VmId, who: PrincipalDep, st: StateDep) -> VmOut:
    life = lifecycle_of(st)
    return vm_out(await run_in_threadpool(life.stop, who.user_id, vm_id))


@images_router.get(
    "",
    response_model=ListEnvelope[ImageOut],
    summary="List images",
    description="The images on this node. Add one with `corral image build` or `corral image import`.",
    responses=errors(*AUTHED),
)
def list_images(who: PrincipalDep, st: StateDep) -> ListEnvelope[ImageOut]:
    life = lifecycle_of(st)
    data = [
        ImageOut(
            name=i.name,
            size_bytes=i.size_bytes,
            created_at=i.created_at,
            source=i.source,
            default=i.name == life.default_image,
        )
        for i in life.node.images.all()
    ]
    return ListEnvelope[ImageOut](data=data, has_more=False, cursor=None)


def check_vm_id(vm_id: str) -> None:
    if not has_prefix(vm_id, Prefix.VM):
        raise vms.vm_not_found(vm_id)
