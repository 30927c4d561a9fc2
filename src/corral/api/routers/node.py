"""``GET /v1/node``: this host's capacity, what is committed to VMs and what they use (operators only)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.api.deps import PrincipalDep, StateDep
from corral.api.routers.common import AUTHED, errors
from corral.api.schemas import Response
from corral.domain.capacity import Amounts
from corral.domain.errors import CorralError
from corral.services import vms
from corral.services.lifecycle import NodeUnavailable
from corral.store.tables import User

router = APIRouter(prefix="/v1/node", tags=["node"])


class Forbidden(CorralError):
    status = 403
    code = "forbidden"


class AmountsOut(Response):
    vcpus: int
    mem_mib: int
    disk_mib: int


class CommittedOut(AmountsOut):
    vms: int  # VMs that are not destroyed (they hold what they were given until destroyed)
    warm_pool: int  # sandboxes booted ahead, not yet a VM's (counted in the sums)


class RatiosOut(Response):
    vcpus: float
    mem: float
    disk: float


class UsedOut(Response):
    mem_bytes: int | None  # the sandboxes' parent memory cgroup
    mem_limit_bytes: int | None
    disk_bytes: int | None  # the parent qgroup: every sandbox disk and capture on the pool
    disk_limit_bytes: int | None
    pool_size_bytes: int | None  # the sparse file's size and what it takes on the host now
    pool_allocated_bytes: int | None
    host_free_bytes: int | None  # free on the data directory's filesystem


class NodeOut(Response):
    id: str
    capacity: AmountsOut
    overcommit: RatiosOut
    admittable: AmountsOut
    committed: CommittedOut
    used: UsedOut


def is_operator(session: Session, user_id: str, operator_emails: tuple[str, ...]) -> bool:
    """An operator is a user whose e-mail is in CORRAL_OPERATOR_EMAILS; with none set, the first user who
    signed up (the one who installed Corral)."""
    if operator_emails:
        email = session.scalar(select(User.email).where(User.id == user_id))
        return email is not None and email.lower() in operator_emails
    first = session.scalar(select(User.id).order_by(User.created_at, User.id).limit(1))
    return first == user_id


@router.get(
    "",
    response_model=NodeOut,
    summary="This node's capacity (operators)",
    description="What every sandbox shares (`capacity`: the host's CPUs, the parent memory cgroup's limit, the "
    "parent disk qgroup's limit), how far creates may go past it (`overcommit`, `admittable` = capacity x "
    "ratio), what VMs that are not destroyed and the warm pool hold (`committed`; a create past `admittable` "
    "is refused with 503 `node_full`), and what is in use now (`used`). Operators only: the e-mails in "
    "CORRAL_OPERATOR_EMAILS, or the first user when none are set (403 `forbidden` for others).",
    responses=errors(*AUTHED, 403, 503),
)
def get_node(who: PrincipalDep, st: StateDep) -> NodeOut:
    with (st.reads or st.sessions)() as session:
        if not is_operator(session, who.user_id, st.settings.operator_emails):
            raise Forbidden("Only an operator can read the node (see CORRAL_OPERATOR_EMAILS)")
        life = st.lifecycle
        if life is None or life.node.capacity is None:
            raise NodeUnavailable("This server runs no sandboxes (CORRAL_NODE=off)")
        pool = life.pool.reserved()
        held = vms.held(session) + pool
    capacity = life.node.capacity
    admission = life.admission or vms.Admission()
    admittable = capacity.admittable(admission.ratios)
    return NodeOut(
        id=life.node.node_id,
        capacity=_amounts(Amounts(0, capacity.vcpus, capacity.mem_mib, capacity.disk_mib)),
        overcommit=RatiosOut(
            vcpus=admission.ratios.vcpus, mem=admission.ratios.mem, disk=admission.ratios.disk
        ),
        admittable=_amounts(admittable),
        committed=CommittedOut(
            vms=held.vms,
            warm_pool=life.pool.ready_count(),
            vcpus=held.vcpus,
            mem_mib=held.mem_mib,
            disk_mib=held.disk_mib,
        ),
        used=UsedOut.model_validate(life.node.usage()),
    )


def _amounts(a: Amounts) -> AmountsOut:
    return AmountsOut(vcpus=a.vcpus, mem_mib=a.mem_mib, disk_mib=a.disk_mib)
