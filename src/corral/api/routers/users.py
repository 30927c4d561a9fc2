"""Signup and the caller's own account."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter

from corral.api.deps import AnonLimit, PrincipalDep, SessionDep, StateDep
from corral.api.routers.common import AUTHED, errors
from corral.api.schemas import (
    ApiKeyOut,
    PasswordChangeOut,
    PasswordChangeRequest,
    SignupRequest,
    SignupResponse,
    UserOut,
)
from corral.domain.errors import ValidationFailed
from corral.services import users
from corral.services.lockout import LockoutPolicy

router = APIRouter(prefix="/v1/users", tags=["users"])


@router.post(
    "",
    status_code=201,
    response_model=SignupResponse,
    summary="Create a user",
    description="Creates an account and returns an API key whose token is shown once. No authentication.",
    responses=errors(400, 409, 422, 429),
    dependencies=[AnonLimit],
)
def create_user(body: SignupRequest, session: SessionDep, st: StateDep) -> SignupResponse:
    try:
        user, issued = users.signup(
            session,
            st.services.clock,
            first_name=body.first_name,
            last_name=body.last_name,
            email=body.email,
            password=body.password.get_secret_value(),
        )
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from None
    key = issued.key
    return SignupResponse(
        api_key=ApiKeyOut(id=key.id, name=key.name, token=issued.token, created_at=key.created_at),
        user=UserOut.model_validate(user),
    )


@router.get("/me", response_model=UserOut, summary="The authenticated user", responses=errors(*AUTHED))
def me(who: PrincipalDep, session: SessionDep) -> UserOut:
    return UserOut.model_validate(users.get_user(session, who.user_id))


def lockout_policy(st: StateDep) -> LockoutPolicy:
    return LockoutPolicy(
        max_failures=st.settings.login_max_failures,
        window=timedelta(seconds=st.settings.login_lockout_s),
        lockout=timedelta(seconds=st.settings.login_lockout_s),
    )


@router.post(
    "/me/password",
    response_model=PasswordChangeOut,
    summary="Change the password",
    description="Needs the current password. Every other API key of the account is revoked (the key of this "
    "request stays). Wrong passwords count towards the account's lockout (429 with `Retry-After`, as on "
    "`/activate`); a wrong current password answers 422 `wrong_password`.",
    responses=errors(*AUTHED, 409, 422),
)
def change_password(body: PasswordChangeRequest, who: PrincipalDep, st: StateDep) -> PasswordChangeOut:
    revoked = users.change_password(
        st.sessions,
        st.services.clock,
        who,
        current=body.current_password.get_secret_value(),
        new=body.new_password.get_secret_value(),
        policy=lockout_policy(st),
    )
    return PasswordChangeOut(revoked_keys=revoked)
