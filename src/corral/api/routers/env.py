"""Environment variables: ``/v1/env``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from corral.api.deps import PrincipalDep, SessionDep, StateDep
from corral.api.routers.common import AUTHED, Cursor, Limit, envelope, errors
from corral.api.schemas import EnvOut, EnvPutRequest, ListEnvelope
from corral.domain.errors import ValidationFailed
from corral.domain.pagination import page_request
from corral.services import env

router = APIRouter(prefix="/v1/env", tags=["environment variables"])
Key = Annotated[str, Path(description="Variable name")]


@router.get(
    "",
    response_model=ListEnvelope[EnvOut],
    summary="List environment variables",
    description="Newest first. `limit` defaults to 50, at most 200.",
    responses=errors(*AUTHED),
)
def list_env(
    who: PrincipalDep, session: SessionDep, cursor: Cursor = None, limit: Limit = None
) -> ListEnvelope[EnvOut]:
    page = env.list_env(
        session, who.user_id, page_request(env.LIST, limit=limit, cursor=cursor, order="desc")
    )
    return envelope(page, EnvOut)


@router.get(
    "/{key}", response_model=EnvOut, summary="Get an environment variable", responses=errors(*AUTHED, 404)
)
def get_env(key: Key, who: PrincipalDep, session: SessionDep) -> EnvOut:
    return EnvOut.model_validate(env.get_env(session, who.user_id, key))


@router.put(
    "/{key}",
    response_model=EnvOut,
    summary="Set an environment variable",
    description="Creates the variable, or replaces its value. Keys: letters, digits and underscores, not "
    "starting with a digit, at most 256 characters. Values: at most 32 KiB, no NUL.",
    responses=errors(*AUTHED, 422),
)
def put_env(key: Key, body: EnvPutRequest, who: PrincipalDep, session: SessionDep, st: StateDep) -> EnvOut:
    try:
        row = env.put_env(session, st.services.clock, who.user_id, key, body.value)
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from None
    return EnvOut.model_validate(row)


@router.delete(
    "/{key}",
    status_code=204,
    response_class=Response,
    summary="Delete an environment variable",
    responses=errors(*AUTHED, 404),
)
def delete_env(key: Key, who: PrincipalDep, session: SessionDep) -> Response:
    env.delete_env(session, who.user_id, key)
    return Response(status_code=204)
