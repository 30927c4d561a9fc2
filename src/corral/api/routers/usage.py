"""Usage and cost: ``GET /v1/usage``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query

from corral.api.deps import PrincipalDep, StateDep
from corral.api.routers.common import AUTHED, errors
from corral.api.schemas import PricesOut, UsageLineOut, UsageOut, UsageTotalsOut
from corral.domain import rollup
from corral.domain.pricing import cents
from corral.services import usage

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get(
    "",
    response_model=UsageOut,
    summary="Usage and cost",
    description="What your VMs used and cost, one line per UTC day and VM, from `from` to `to` "
    "(inclusive, `YYYY-MM-DD`, at most 366 days), optionally for one VM. CPU seconds and memory "
    "GiB-seconds come from the sandboxes' cgroups (sampled every `CORRAL_USAGE_INTERVAL_S` and whenever a "
    "VM stops, hibernates or is destroyed), disk GiB-hours from the disk allocated and the time the VM "
    "existed, egress bytes from the egress proxy. `cost_cents` per line from the price table shown; "
    "`total` is the sum of the lines.",
    responses=errors(*AUTHED),
)
def get_usage(
    who: PrincipalDep,
    st: StateDep,
    from_: Annotated[str | None, Query(alias="from", description="First day, YYYY-MM-DD (UTC)")] = None,
    to: Annotated[str | None, Query(description="Last day, YYYY-MM-DD (UTC), inclusive")] = None,
    vm_id: Annotated[str | None, Query(description="Only this VM", max_length=64)] = None,
) -> UsageOut:
    first, last = rollup.parse_range(from_, to)
    with (st.reads or st.sessions)() as session:
        rep = usage.report(
            session,
            who.user_id,
            first,
            last,
            st.settings.prices,
            st.services.clock.now(),
            vm_id=vm_id,
        )
    t = rep.totals
    return UsageOut.model_validate(
        {
            "from": first.isoformat(),
            "to": last.isoformat(),
            "prices": PricesOut.model_validate(asdict(rep.prices)),
            "data": [
                UsageLineOut(
                    date=line.day.isoformat(),
                    vm_id=line.vm_id,
                    vm_name=rep.names.get(line.vm_id),
                    cpu_seconds=line.cpu_seconds,
                    mem_gib_seconds=line.mem_gib_seconds,
                    disk_gib_hours=line.disk_gib_hours,
                    egress_bytes=line.egress_bytes,
                    cost_cents=cents(line.cost_micro_cents),
                )
                for line in rep.lines
            ],
            "total": UsageTotalsOut(
                cpu_seconds=t.cpu_seconds,
                mem_gib_seconds=t.mem_gib_seconds,
                disk_gib_hours=t.disk_gib_hours,
                egress_bytes=t.egress_bytes,
                cost_cents=cents(t.cost_micro_cents),
            ),
        }
    )
