"""Account-level egress: the policy mode and the allowlist rules."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from corral.api.deps import PrincipalDep, SessionDep, StateDep
from corral.api.routers.common import AUTHED, Cursor, Limit, SortOrder, envelope, errors
from corral.api.schemas import ListEnvelope, PolicyIn, PolicyOut, RuleCreateRequest, RuleOut
from corral.domain.pagination import page_request
from corral.services import egress

router = APIRouter(prefix="/v1/egress", tags=["egress"])
RuleId = Annotated[str, Path(description="The rule ID (egr_...)", max_length=64)]


@router.get(
    "/policy",
    response_model=PolicyOut,
    summary="Get the default egress policy",
    description="`enforce`: block all egress except to hosts/CIDRs in the allowlist. `warn`: allow all "
    "traffic but log requests to non-allowlisted destinations. New accounts start in `enforce`.",
    responses=errors(*AUTHED),
)
def get_policy(who: PrincipalDep, session: SessionDep) -> PolicyOut:
    return PolicyOut(mode=egress.get_mode(session, who.user_id).value)


@router.put(
    "/policy",
    response_model=PolicyOut,
    summary="Update the default egress policy",
    responses=errors(*AUTHED, 422),
)
def put_policy(body: PolicyIn, who: PrincipalDep, session: SessionDep, st: StateDep) -> PolicyOut:
    mode = egress.set_mode(session, st.services.clock, who.user_id, egress.Mode(body.mode))
    return PolicyOut(mode=mode.value)


@router.get(
    "/rules",
    response_model=ListEnvelope[RuleOut],
    summary="List default egress rules",
    description="`limit` defaults to 50, at most 200. `sort`: created_at (default) or host; `order`: desc "
    "(default) or asc.",
    responses=errors(*AUTHED),
)
def list_rules(
    who: PrincipalDep,
    session: SessionDep,
    host: Annotated[str | None, Query(description="Filter by exact host", max_length=255)] = None,
    cidr: Annotated[str | None, Query(description="Filter by exact CIDR", max_length=64)] = None,
    name: Annotated[str | None, Query(description="Filter by exact name", max_length=100)] = None,
    cursor: Cursor = None,
    limit: Limit = None,
    sort: Annotated[str | None, Query(description="created_at or host")] = None,
    order: SortOrder = None,
) -> ListEnvelope[RuleOut]:
    req = page_request(egress.LIST_RULES, limit=limit, cursor=cursor, sort=sort, order=order)
    page = egress.list_rules(session, who.user_id, req, host=host, cidr=cidr, name=name)
    return envelope(page, RuleOut)


@router.post(
    "/rules",
    status_code=201,
    response_model=RuleOut,
    summary="Create a default egress rule",
    description="Provide `host` (exact, or a single-level wildcard like `*.example.org`) or `cidr`, not "
    "both. `name`, if given, is unique in the account.",
    responses=errors(*AUTHED, 409, 422),
)
def create_rule(body: RuleCreateRequest, who: PrincipalDep, session: SessionDep, st: StateDep) -> RuleOut:
    rule = egress.NewRule(name=body.name, host=body.host, cidr=body.cidr, comment=body.comment)
    return RuleOut.model_validate(egress.create_rule(session, st.services.clock, who.user_id, rule))


@router.get(
    "/rules/{rule_id}", response_model=RuleOut, summary="Get an egress rule", responses=errors(*AUTHED, 404)
)
def get_rule(rule_id: RuleId, who: PrincipalDep, session: SessionDep) -> RuleOut:
    return RuleOut.model_validate(egress.get_rule(session, who.user_id, rule_id))


@router.delete(
    "/rules/{rule_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a default egress rule",
    responses=errors(*AUTHED, 404),
)
def delete_rule(rule_id: RuleId, who: PrincipalDep, session: SessionDep) -> Response:
    egress.delete_rule(session, who.user_id, rule_id)
    return Response(status_code=204)
