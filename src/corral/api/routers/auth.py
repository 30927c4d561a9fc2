"""Device-code login: request a code (no auth), poll it (no auth), approve it (signed in)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse

from corral.api import pages
from corral.api.deps import AnonLimit, PrincipalDep, SessionDep, StateDep, charge
from corral.api.routers.common import AUTHED, errors
from corral.api.routers.users import lockout_policy
from corral.api.schemas import (
    DataEnvelope,
    DeviceApproveOut,
    DeviceApproveRequest,
    DeviceCodeOut,
    DevicePollOut,
)
from corral.domain import validation
from corral.domain.errors import CorralError
from corral.services import device, lockout, users
from corral.store.db import transaction

router = APIRouter(tags=["auth"])


def _base_url(request: Request, st: StateDep) -> str:
    return (st.settings.public_url or str(request.base_url)).rstrip("/")


@router.post(
    "/v1/auth/device/code",
    response_model=DataEnvelope[DeviceCodeOut],
    summary="Request a device code",
    description="Start a login from a device without a browser: show `code` to the user, send them to "
    "`verification_uri`, and poll `GET /v1/auth/device/poll` until it says `authorized`. No authentication.",
    responses=errors(400, 429),
    dependencies=[AnonLimit],
)
def device_code(request: Request, session: SessionDep, st: StateDep) -> DataEnvelope[DeviceCodeOut]:
    row = device.request_code(session, st.services.clock, st.services.device_code_ttl_seconds)
    return DataEnvelope(
        data=DeviceCodeOut(
            code=row.code, verification_uri=f"{_base_url(request, st)}/activate", expires_at=row.expires_at
        )
    )


@router.get(
    "/v1/auth/device/poll",
    response_model=DataEnvelope[DevicePollOut],
    response_model_exclude_none=True,
    summary="Poll device authorization",
    description="`pending`: keep polling. `authorized`: `token` is present, once. `expired`: request a new "
    "code (also the answer for a code that is unknown or already used). No authentication.",
    responses=errors(400, 429),
    dependencies=[AnonLimit],
)
def device_poll(
    code: Annotated[str, Query(description="The device code from the code request", max_length=32)],
    session: SessionDep,
    st: StateDep,
) -> DataEnvelope[DevicePollOut]:
    result = device.poll(session, st.services.clock, code)
    return DataEnvelope(data=DevicePollOut(status=result.status.value, token=result.token))


@router.post(
    "/v1/auth/device/approve",
    response_model=DataEnvelope[DeviceApproveOut],
    summary="Approve a device code",
    description="The signed-in user approves the code their device shows; the device's next poll receives "
    "a new API key for this user.",
    responses=errors(*AUTHED, 404, 409, 422),
)
def device_approve(
    body: DeviceApproveRequest, who: PrincipalDep, session: SessionDep, st: StateDep
) -> DataEnvelope[DeviceApproveOut]:
    charge(st, st.anon_limiter, f"approve:{who.user_id}")  # approvals are rare: guessing codes stays slow
    row = device.approve(session, st.services.clock, body.code, who.user_id)
    return DataEnvelope(data=DeviceApproveOut(code=row.code, status="approved"))


@router.get("/activate", response_class=HTMLResponse, include_in_schema=False)
def activate_form(code: Annotated[str, Query(max_length=32)] = "") -> HTMLResponse:
    return _html(pages.activate(code=code))


@router.post("/activate", response_class=HTMLResponse, include_in_schema=False, dependencies=[AnonLimit])
def activate_submit(
    session: SessionDep,
    st: StateDep,
    code: Annotated[str, Form(max_length=32)],
    email: Annotated[str, Form(max_length=254)],
    password: Annotated[str, Form(max_length=1024)],
) -> HTMLResponse:
    if not all(validation.is_storable(field) for field in (code, email, password)):
        return _html(pages.activate(code="", error="The form holds characters that are not allowed."), 400)
    # counted (and committed) before the password is checked, and before this request's own transaction
    # starts; the same answer whether or not an account has this email, and no password is checked then
    with transaction(st.sessions) as counting:
        wait = lockout.attempt(counting, st.services.clock.now(), email, lockout_policy(st))
    if wait:
        page = pages.activate(
            code=code, error=f"Too many wrong passwords for this email; try again in {wait} s."
        )
        return _html(page, 429, {"Retry-After": str(wait)})
    user = users.check_password(session, email, password)
    if user is None:
        return _html(pages.activate(code=code, error="Wrong email or password."), 401)
    lockout.succeeded(session, email)
    try:
        row = device.approve(session, st.services.clock, code, user.id)
    except CorralError as exc:
        return _html(pages.activate(code=code, error=exc.message), exc.status)
    return _html(pages.approved(row.code))


def _html(body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers={**pages.SECURITY_HEADERS, **(headers or {})})
