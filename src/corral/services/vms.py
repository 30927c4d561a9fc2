"""VM records: create, read, list and move through the lifecycle (the transition table decides each move).
No FastAPI, no host effects: ``corral.services.lifecycle`` drives the node and calls these."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.domain import validation
from corral.domain.capacity import (
    Amounts,
    NodeCapacity,
    NodeFull,
    Overcommit,
    Quotas,
    check_node,
    check_quota,
)
from corral.domain.clock import Clock
from corral.domain.errors import Conflict, NotFound, ValidationFailed, not_found
from corral.domain.ids import Prefix, has_prefix, new_id
from corral.domain.pagination import ListSpec, Page, PageRequest
from corral.domain.vm_states import Detail, Status, can_move, check_move, details_of
from corral.store.paging import SortColumns, paginate
from corral.store.tables import Vm

LIST = ListSpec(default_limit=20, max_limit=100, sorts=("created_at", "updated_at", "name"))
_SORTS: SortColumns = {
    "created_at": (Vm.created_at, datetime),
    "updated_at": (Vm.updated_at, datetime),
    "name": (Vm.name, str),
}


@dataclass(frozen=True)
class ResourceLimits:
    """Documented defaults and maxima for ``vcpus``, ``mem_mib`` and ``disk_mib``."""

    default_vcpus: int = 1
    max_vcpus: int = 4
    default_mem_mib: int = 1024
    min_mem_mib: int = 64
    max_mem_mib: int = 8192
    default_disk_mib: int = 4096
    min_disk_mib: int = 64
    max_disk_mib: int = 65536


@dataclass(frozen=True)
class NewVm:
    name: str
    public_key: str
    image: str
    vcpus: int | None = None
    mem_mib: int | None = None
    disk_mib: int | None = None
    snapshot_id: str | None = None
    egress_mode: str | None = None
    egress_rules: tuple[tuple[str | None, str | None], ...] | None = None  # (host, cidr) pairs
    timeout: int | None = None  # auto-destroy after this many seconds


MAX_TIMEOUT_S = 7 * 24 * 3600


def check_timeout(seconds: int) -> int:
    """An auto-destroy timeout: 1 second to 7 days."""
    return _check_range("timeout", seconds, 1, MAX_TIMEOUT_S)


def vm_not_found(vm_id: str) -> NotFound:
    return not_found("vm", vm_id, label="VM")


def _check_range(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ValidationFailed(f"{field} must be between {low} and {high}")
    return value


def validate_new(new: NewVm, limits: ResourceLimits) -> NewVm:
    try:
        name = validation.vm_name(new.name)
        key = validation.ssh_public_key(new.public_key)
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from None
    vcpus = _check_range("vcpus", new.vcpus or limits.default_vcpus, 1, limits.max_vcpus)
    mem = _check_range(
        "mem_mib", new.mem_mib or limits.default_mem_mib, limits.min_mem_mib, limits.max_mem_mib
    )
    disk = _check_range(
        "disk_mib", new.disk_mib or limits.default_disk_mib, limits.min_disk_mib, limits.max_disk_mib
    )
    for field, value in (("vcpus", new.vcpus), ("mem_mib", new.mem_mib), ("disk_mib", new.disk_mib)):
        if value is not None and value < 1:
            raise ValidationFailed(f"{field} must be a positive integer")
    return NewVm(
        name,
        key,
        new.image,
        vcpus,
        mem,
        disk,
        new.snapshot_id,
        new.egress_mode,
        _egress_rules(new.egress_rules),
        None if new.timeout is None else check_timeout(new.timeout),
    )


def _egress_rules(
    rules: tuple[tuple[str | None, str | None], ...] | None,
) -> tuple[tuple[str | None, str | None], ...] | None:
    if not rules:
        return None
    out: list[tuple[str | None, str | None]] = []
    for i, (host, cidr) in enumerate(rules):
        if (host is None) == (cidr is None):
            raise ValidationFailed(f"egress.rules[{i}]: give host or cidr, not both")
        try:
            pair = (
                None if host is None else validation.host_pattern(host, allow_any=False),
                None if cidr is None else validation.cidr(cidr),
            )
        except ValueError as exc:
            raise ValidationFailed(f"egress.rules[{i}]: {exc}") from None
        if pair not in out:
            out.append(pair)
    return tuple(out)


def egress_rules_of(row: Vm) -> list[dict[str, str]]:
    """The VM's own egress rules as stored (``[{"host": ...} | {"cidr": ...}]``)."""
    if not row.egress_rules:
        return []
    rules: list[dict[str, str]] = json.loads(row.egress_rules)
    return rules


def _name_taken(name: str) -> Conflict:
    return Conflict(f"A VM named {name} already exists", code="vm_name_taken")


@dataclass(frozen=True)
class Admission:
    """What a create is admitted against: the account's quotas and, on a node, its capacity (None: no node
    check) with the overcommit ratios; ``reserved`` is what sandboxes that are not VMs yet hold (the warm
    pool)."""

    quotas: Quotas = dataclasses.field(default_factory=Quotas)
    capacity: NodeCapacity | None = None
    ratios: Overcommit = dataclasses.field(default_factory=Overcommit)
    reserved: Callable[[], Amounts] = dataclasses.field(default=lambda: Amounts())


_ADMISSION_LOCK = 0x636F7272  # PostgreSQL advisory lock: one admission at a time across servers


def held(session: Session, user_id: str | None = None) -> Amounts:
    """What the VMs that are not destroyed hold (one account's, or every account's)."""
    stmt = select(
        func.count(Vm.id),
        func.coalesce(func.sum(Vm.vcpus), 0),
        func.coalesce(func.sum(Vm.mem_mib), 0),
        func.coalesce(func.sum(Vm.disk_mib), 0),
    ).where(Vm.status_detail != Detail.DESTROYED.value)
    if user_id is not None:
        stmt = stmt.where(Vm.user_id == user_id)
    count, vcpus, mem, disk = session.execute(stmt).one()
    return Amounts(int(count), int(vcpus), int(mem), int(disk))


def admit(session: Session, admission: Admission, user_id: str, new: NewVm, *, count: int = 1) -> None:
    """Refuse ``count`` VMs like ``new`` that would pass the account's quotas (409 ``quota_exceeded``) or
    the node's capacity (503 ``node_full``). Call in the transaction that inserts them: on SQLite it holds
    the write lock (BEGIN IMMEDIATE), on PostgreSQL an advisory lock, so concurrent creates are counted one
    after the other."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADMISSION_LOCK})
    asked = Amounts(1, new.vcpus or 0, new.mem_mib or 0, new.disk_mib or 0).times(count)
    check_quota(admission.quotas, held(session, user_id), asked)
    if admission.capacity is not None:
        check_node(admission.capacity, admission.ratios, held(session) + admission.reserved(), asked)


def node_has_room(session: Session, admission: Admission, asked: Amounts) -> bool:
    """Whether the node could take ``asked`` more now (the warm pool asks before each boot)."""
    if admission.capacity is None:
        return True
    try:
        check_node(admission.capacity, admission.ratios, held(session) + admission.reserved(), asked)
    except NodeFull:
        return False
    return True


def create_vm(
    session: Session,
    clock: Clock,
    user_id: str,
    new: NewVm,
    *,
    vm_id: str | None = None,
    admission: Admission | None = None,
) -> Vm:
    """Insert a queued VM (with ``vm_id`` when its sandbox was booted ahead under that id), admitted first
    when ``admission`` is given. ``new`` must have been through ``validate_new``."""
    if admission is not None:
        admit(session, admission, user_id, new)
    now = clock.now()
    row = Vm(
        id=vm_id or new_id(Prefix.VM),
        user_id=user_id,
        name=new.name,
        public_key=new.public_key,
        status_detail=Detail.QUEUED.value,
        image=new.image,
        snapshot_id=new.snapshot_id,
        vcpus=new.vcpus,
        mem_mib=new.mem_mib,
        disk_mib=new.disk_mib,
        egress_mode=new.egress_mode,
        egress_rules=None
        if not new.egress_rules
        else json.dumps([{"host": h} if h is not None else {"cidr": c} for h, c in new.egress_rules]),
        container_id=vm_id,  # a pooled sandbox runs already: reconciliation must know it is this VM's
        timeout=new.timeout,
        expires_at=None if new.timeout is None else now + timedelta(seconds=new.timeout),
        created_at=now,
        updated_at=now,
    )
    # the partial unique index on (user_id, name) of live VMs decides, also between concurrent creates
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        raise _name_taken(new.name) from None
    return row


def get_vm(session: Session, user_id: str, vm_id: str) -> Vm:
    row = session.get(Vm, vm_id) if has_prefix(vm_id, Prefix.VM) else None
    if row is None or row.user_id != user_id:
        raise vm_not_found(vm_id)
    return row


def list_vms(
    session: Session,
    user_id: str,
    request: PageRequest,
    *,
    status: Status | None = None,
    detail: Detail | None = None,
    name: str | None = None,
) -> Page[Vm]:
    stmt = select(Vm).where(Vm.user_id == user_id)
    if status is not None:
        stmt = stmt.where(Vm.status_detail.in_([d.value for d in details_of(status)]))
    if detail is not None:
        stmt = stmt.where(Vm.status_detail == detail.value)
    if name is not None:
        stmt = stmt.where(Vm.name == name)
    return paginate(session, stmt, request=request, sort_columns=_SORTS, id_column=Vm.id, render=lambda r: r)


def move(
    session: Session,
    clock: Clock,
    vm_id: str,
    target: Detail,
    *,
    expect: Collection[Detail] | None = None,
    reason: str | None = None,
    **fields: object,
) -> bool:
    """Move the VM to ``target`` if it is (still) in one of ``expect`` (default: any state the table allows
    to move there). A compare-and-set: False when someone else moved it first. Raises IllegalTransition if
    ``expect`` names a state the table forbids."""
    allowed = list(expect) if expect is not None else [d for d in Detail if can_move(d, target)]
    for current in allowed:
        check_move(current, target)
    values: dict[str, object] = {"status_detail": target.value, "updated_at": clock.now(), **fields}
    if target is Detail.FAILED:
        values["failure_reason"] = reason or "unknown failure"
    elif reason is not None:
        values["failure_reason"] = reason
    result = session.execute(
        update(Vm)
        .where(Vm.id == vm_id, Vm.status_detail.in_([d.value for d in allowed]))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def active_vms(session: Session) -> list[Vm]:
    """Every VM whose sandbox may exist on the host (for reconciliation)."""
    return list(session.scalars(select(Vm).where(Vm.status_detail != Detail.DESTROYED.value)))
