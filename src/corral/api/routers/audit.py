"""The egress audit trail: ``GET /v1/audit/egress``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from corral.api.deps import PrincipalDep, SessionDep
from corral.api.routers.common import AUTHED, Cursor, Limit, SortOrder, envelope, errors
from corral.api.schemas import EgressEventOut, ListEnvelope
from corral.domain.errors import InvalidParameter
from corral.domain.pagination import page_request
from corral.services import audit

router = APIRouter(prefix="/v1/audit", tags=["audit"])


def _timestamp(name: str, raw: str | None) -> datetime | None:
    if raw is None:
        return None
    try:
        stamp = datetime.fromisoformat(raw)
        return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidParameter(f"{name} must be an ISO 8601 timestamp, like 2026-02-28T12:00:00Z") from None


@router.get(
    "/egress",
    response_model=ListEnvelope[EgressEventOut],
    summary="List egress audit events",
    description="Always sorted by timestamp (`order`: desc by default). `limit` defaults to 50, at most "
    "500. `cidr` matches events whose address lies inside the given network. `since` and `until` are "
    "exclusive; a timestamp without a zone is UTC.",
    responses=errors(*AUTHED),
)
def list_egress_events(
    who: PrincipalDep,
    session: SessionDep,
    vm_id: Annotated[str | None, Query(description="Filter by VM ID", max_length=64)] = None,
    verdict: Annotated[str | None, Query(description="allowed or denied")] = None,
    allowed: Annotated[bool | None, Query(description="Whether the request was actually permitted")] = None,
    mode: Annotated[str | None, Query(description="enforce or warn")] = None,
    host: Annotated[str | None, Query(description="Filter by exact host", max_length=255)] = None,
    cidr: Annotated[str | None, Query(description="Events inside this network", max_length=64)] = None,
    protocol: Annotated[str | None, Query(description="http, tls, tcp or dns")] = None,
    since: Annotated[str | None, Query(description="Only events after this ISO 8601 timestamp")] = None,
    until: Annotated[str | None, Query(description="Only events before this ISO 8601 timestamp")] = None,
    cursor: Cursor = None,
    limit: Limit = None,
    order: SortOrder = None,
) -> ListEnvelope[EgressEventOut]:
    req = page_request(audit.LIST, limit=limit, cursor=cursor, order=order)
    flt = audit.EventFilter(
        vm_id=vm_id,
        verdict=verdict,
        allowed=allowed,
        mode=mode,
        host=host,
        cidr=cidr,
        protocol=protocol,
        since=_timestamp("since", since),
        until=_timestamp("until", until),
    )
    page = audit.list_events(session, who.user_id, req, flt)
    return envelope(page, EgressEventOut)
