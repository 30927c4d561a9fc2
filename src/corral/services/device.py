"""Device-code login: a CLI asks for a code, a signed-in user approves it, the CLI's poll gets a new key.

The key is created at the first poll after approval, so no plaintext token is ever stored; the code is then
consumed and cannot deliver a second token.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from corral.domain.clock import Clock
from corral.domain.errors import Conflict, InvalidParameter, NotFound, ValidationFailed
from corral.services.users import issue_key
from corral.store.tables import DeviceCode

_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O: read aloud and typed by people


class PollStatus(StrEnum):
    PENDING = "pending"
    AUTHORIZED = "authorized"
    EXPIRED = "expired"


@dataclass(frozen=True)
class PollResult:
    status: PollStatus
    token: str | None = None

    def __repr__(self) -> str:
        return f"PollResult(status={self.status.value!r})"


_CODE = re.compile(r"[A-Z]{4}[0-9]{4}")


def normalise_code(code: str) -> str:
    """Accept what a person types: any case, with or without the dash, surrounding spaces."""
    raw = code.strip().upper().replace("-", "").replace(" ", "")
    if not _CODE.fullmatch(raw):
        raise InvalidParameter("code must look like ABCD-1234")
    return f"{raw[:4]}-{raw[4:]}"


def _new_code() -> str:
    letters = "".join(secrets.choice(_LETTERS) for _ in range(4))
    digits = "".join(secrets.choice(string.digits) for _ in range(4))
    return f"{letters}-{digits}"


def _code_not_found(code: str) -> NotFound:
    return NotFound(f"No device code {code}", code="device_code_not_found")


def request_code(session: Session, clock: Clock, ttl_seconds: int) -> DeviceCode:
    now = clock.now()
    session.execute(delete(DeviceCode).where(DeviceCode.expires_at < now - timedelta(days=1)))
    for _ in range(10):
        code = _new_code()
        if session.get(DeviceCode, code) is None:
            row = DeviceCode(
                code=code,
                status="pending",
                created_at=now,
                expires_at=now + timedelta(seconds=ttl_seconds),
            )
            session.add(row)
            session.flush()
            return row
    raise Conflict("Could not allocate a device code; try again", code="device_code_unavailable")


def _expired(row: DeviceCode, now: datetime) -> bool:
    return row.expires_at <= now


def poll(session: Session, clock: Clock, code: str) -> PollResult:
    """A code that is unknown, already used or past its time answers ``expired``: request a new one."""
    code = normalise_code(code)
    now = clock.now()
    # Consume an approved code in one conditional UPDATE: of concurrent polls, exactly one wins the token.
    consumed = session.execute(
        update(DeviceCode)
        .where(DeviceCode.code == code, DeviceCode.status == "approved", DeviceCode.expires_at > now)
        .values(status="consumed")
        .returning(DeviceCode.user_id)
    ).scalar_one_or_none()
    if consumed is not None:
        issued = issue_key(session, clock, consumed, name="CLI (device login)")
        return PollResult(PollStatus.AUTHORIZED, issued.token)
    row = session.get(DeviceCode, code)
    if row is None or row.status != "pending" or _expired(row, now):
        return PollResult(PollStatus.EXPIRED)
    return PollResult(PollStatus.PENDING)


def approve(session: Session, clock: Clock, code: str, user_id: str) -> DeviceCode:
    try:
        code = normalise_code(code)
    except InvalidParameter as exc:
        raise ValidationFailed(exc.message) from None
    row = session.get(DeviceCode, code, with_for_update=True)
    if row is None or row.status == "consumed":
        raise _code_not_found(code)
    if _expired(row, clock.now()):
        raise ValidationFailed(
            f"Device code {code} has expired; request a new one", code="device_code_expired"
        )
    if row.status == "approved" and row.user_id != user_id:
        raise Conflict(f"Device code {code} was already approved", code="device_code_used")
    row.status = "approved"
    row.user_id = user_id
    session.flush()
    return row
