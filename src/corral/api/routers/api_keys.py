"""The caller's API keys: list (with last use), create a named key, revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from corral.api.deps import PrincipalDep, SessionDep, StateDep
from corral.api.routers.common import AUTHED, Cursor, Limit, errors
from corral.api.schemas import ApiKeyCreateRequest, ApiKeyInfo, ApiKeyOut, ListEnvelope
from corral.domain.pagination import page_request
from corral.services import users
from corral.store.tables import ApiKey

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"])
KeyId = Annotated[str, Path(description="API key ID (`key_...`)", max_length=64)]


def _info(key: ApiKey, current_id: str) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        current=key.id == current_id,
    )


@router.get(
    "",
    response_model=ListEnvelope[ApiKeyInfo],
    summary="List API keys",
    description="The account's keys that are not revoked, newest first; never their tokens. `last_used_at` "
    "is kept to the minute; `current` marks the key of this request. `limit` defaults to 50, at most 200.",
    responses=errors(*AUTHED),
)
def list_keys(
    who: PrincipalDep, session: SessionDep, cursor: Cursor = None, limit: Limit = None
) -> ListEnvelope[ApiKeyInfo]:
    page = users.list_keys(
        session, who.user_id, page_request(users.KEY_LIST, limit=limit, cursor=cursor, order="desc")
    )
    return ListEnvelope[ApiKeyInfo](
        data=[_info(key, who.key_id) for key in page.data], has_more=page.has_more, cursor=page.cursor
    )


@router.post(
    "",
    status_code=201,
    response_model=ApiKeyOut,
    summary="Create an API key",
    description="A new key for the account, named for what it is for; its token is shown once.",
    responses=errors(*AUTHED, 422),
)
def create_key(body: ApiKeyCreateRequest, who: PrincipalDep, session: SessionDep, st: StateDep) -> ApiKeyOut:
    issued = users.create_key(session, st.services.clock, who.user_id, body.name)
    key = issued.key
    return ApiKeyOut(id=key.id, name=key.name, token=issued.token, created_at=key.created_at)


@router.delete(
    "/{key_id}",
    status_code=204,
    response_class=Response,
    summary="Revoke an API key",
    description="At once: the next request with it answers 401. The key of this request may be revoked too.",
    responses=errors(*AUTHED, 404),
)
def revoke_key(key_id: KeyId, who: PrincipalDep, session: SessionDep, st: StateDep) -> Response:
    users.revoke_key(session, st.services.clock, who.user_id, key_id)
    return Response(status_code=204)
