"""Secrets: ``/v1/secrets``. The value is write-only: no response carries it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response

from corral.api.deps import PrincipalDep, SessionDep, StateDep
from corral.api.routers.common import AUTHED, Cursor, Limit, SortOrder, envelope, errors
from corral.api.schemas import ListEnvelope, SecretCreateRequest, SecretOut, SecretUpdateRequest
from corral.domain.pagination import page_request
from corral.security.secretbox import SecretValue
from corral.services import secrets

router = APIRouter(prefix="/v1/secrets", tags=["secrets"])
SecretId = Annotated[str, Path(description="The secret ID (sec_...)", max_length=64)]


@router.post(
    "",
    status_code=201,
    response_model=SecretOut,
    summary="Create a secret",
    description="The value is encrypted at rest and never returned. Inside sandboxes, `env_var` holds "
    "`proxy_value`; the egress proxy swaps it for the value in outbound HTTPS headers to `hosts`.",
    responses=errors(*AUTHED, 409, 422),
)
def create_secret(
    body: SecretCreateRequest, who: PrincipalDep, session: SessionDep, st: StateDep
) -> SecretOut:
    view = secrets.create_secret(
        session,
        st.services,
        who.user_id,
        name=body.name,
        secret=SecretValue(body.secret.get_secret_value()),
        env_var=body.env_var,
        hosts=body.hosts,
        comment=body.comment,
    )
    return SecretOut.model_validate(view)


@router.get(
    "",
    response_model=ListEnvelope[SecretOut],
    summary="List secrets",
    description="`limit` defaults to 50, at most 200. `sort`: created_at (default) or name; `order`: desc "
    "(default) or asc.",
    responses=errors(*AUTHED),
)
def list_secrets(
    who: PrincipalDep,
    session: SessionDep,
    name: Annotated[str | None, Query(description="Filter by exact name", max_length=64)] = None,
    cursor: Cursor = None,
    limit: Limit = None,
    sort: Annotated[str | None, Query(description="created_at or name")] = None,
    order: SortOrder = None,
) -> ListEnvelope[SecretOut]:
    req = page_request(secrets.LIST, limit=limit, cursor=cursor, sort=sort, order=order)
    page = secrets.list_secrets(session, who.user_id, req, name=name)
    return envelope(page, SecretOut)


@router.get("/{secret_id}", response_model=SecretOut, summary="Get a secret", responses=errors(*AUTHED, 404))
def get_secret(secret_id: SecretId, who: PrincipalDep, session: SessionDep) -> SecretOut:
    return SecretOut.model_validate(secrets.get_secret(session, who.user_id, secret_id))


@router.patch(
    "/{secret_id}",
    response_model=SecretOut,
    summary="Update a secret",
    description="Only the fields given change; `hosts` replaces the list. `name` cannot change: delete and "
    "recreate instead. `comment: null` clears the comment.",
    responses=errors(*AUTHED, 404, 409, 422),
)
def update_secret(
    secret_id: SecretId, body: SecretUpdateRequest, who: PrincipalDep, session: SessionDep, st: StateDep
) -> SecretOut:
    changes: dict[str, Any] = {}
    for field in body.model_fields_set:
        value = getattr(body, field)
        changes[field] = (
            SecretValue(value.get_secret_value()) if field == "secret" and value is not None else value
        )
    view = secrets.update_secret(session, st.services, who.user_id, secret_id, **changes)
    return SecretOut.model_validate(view)


@router.delete(
    "/{secret_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a secret",
    responses=errors(*AUTHED, 404),
)
def delete_secret(secret_id: SecretId, who: PrincipalDep, session: SessionDep) -> Response:
    secrets.delete_secret(session, who.user_id, secret_id)
    return Response(status_code=204)
