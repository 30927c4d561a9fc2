"""Environment variables, available in every command run in the owner's sandboxes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.domain import validation
from corral.domain.clock import Clock
from corral.domain.errors import NotFound
from corral.domain.ids import Prefix, new_id
from corral.domain.pagination import ListSpec, Page, PageRequest
from corral.store.paging import SortColumns, paginate
from corral.store.tables import EnvVar

LIST = ListSpec(default_limit=50, max_limit=200, sorts=("created_at",))
_SORTS: SortColumns = {
    "created_at": (EnvVar.created_at, datetime),
}


def _not_found(key: str) -> NotFound:
    return NotFound(f"No environment variable with key {key}", code="env_not_found")


def list_env(session: Session, user_id: str, request: PageRequest) -> Page[EnvVar]:
    stmt = select(EnvVar).where(EnvVar.user_id == user_id)
    return paginate(
        session,
        stmt,
        request=request,
        sort_columns=_SORTS,
        id_column=EnvVar.id,
        render=lambda r: r,
    )


def _find(session: Session, user_id: str, key: str) -> EnvVar | None:
    return session.scalar(select(EnvVar).where(EnvVar.user_id == user_id, EnvVar.key == key))


def get_env(session: Session, user_id: str, key: str) -> EnvVar:
    row = _find(session, user_id, key)
    if row is None:
        raise _not_found(key)
    return row


def put_env(session: Session, clock: Clock, user_id: str, key: str, value: str) -> EnvVar:
    key = validation.env_key(key)
    value = validation.env_value(value)
    now = clock.now()
    for _ in range(2):  # a concurrent PUT of the same new key: the second attempt updates
        row = _find(session, user_id, key)
        if row is not None:
            row.value = value
            row.updated_at = now
            session.flush()
            return row
        row = EnvVar(
            id=new_id(Prefix.ENV), user_id=user_id, key=key, value=value, created_at=now, updated_at=now
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            continue
        return row
    raise RuntimeError("env upsert did not converge")


def delete_env(session: Session, user_id: str, key: str) -> None:
    row = get_env(session, user_id, key)
    session.delete(row)
    session.flush()


def environment_of(session: Session, user_id: str) -> dict[str, str]:
    """Every variable of the user, for the environment of each command run in their sandboxes."""
    return {row.key: row.value for row in session.scalars(select(EnvVar).where(EnvVar.user_id == user_id))}
