"""Secrets: write-only values, encrypted at rest, injected by the egress proxy in place of a placeholder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.domain import validation
from corral.domain.errors import Conflict, ValidationFailed, not_found
from corral.domain.ids import Prefix, has_prefix, new_id
from corral.domain.pagination import ListSpec, Page, PageRequest
from corral.security.secretbox import SecretValue
from corral.services.context import Services
from corral.store.paging import SortColumns, paginate
from corral.store.tables import Secret

PROXY_VALUE_PREFIX = "CORRAL_PROXY_"
LIST = ListSpec(default_limit=50, max_limit=200, sorts=("created_at", "name"))
_SORTS: SortColumns = {
    "created_at": (Secret.created_at, datetime),
    "name": (Secret.name, str),
}

_UNSET: Any = object()


@dataclass(frozen=True)
class SecretView:
    """What the API may show of a secret: everything but the value."""

    id: str
    name: str
    env_var: str
    hosts: list[str]
    proxy_value: str
    comment: str | None
    created_at: datetime
    updated_at: datetime


def proxy_value(name: str) -> str:
    return PROXY_VALUE_PREFIX + name


def view(row: Secret) -> SecretView:
    hosts = json.loads(row.hosts)
    return SecretView(
        id=row.id,
        name=row.name,
        env_var=row.env_var,
        hosts=hosts,
        proxy_value=proxy_value(row.name),
        comment=row.comment,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _context(row: Secret) -> str:
    return f"secret:{row.user_id}:{row.id}"


def _name_taken(name: str) -> Conflict:
    return Conflict(f"A secret named {name} already exists", code="secret_name_taken")


def _env_var_taken(env_var: str) -> Conflict:
    return Conflict(f"A secret with env_var {env_var} already exists", code="env_var_taken")


def _validated(fn: Any, value: Any) -> Any:
    try:
        return fn(value)
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from None


def _check_unique(session: Session, user_id: str, *, name: str | None, env_var: str | None, own: str) -> None:
    if name is not None and session.scalar(
        select(Secret.id).where(Secret.user_id == user_id, Secret.name == name, Secret.id != own)
    ):
        raise _name_taken(name)
    if env_var is not None and session.scalar(
        select(Secret.id).where(Secret.user_id == user_id, Secret.env_var == env_var, Secret.id != own)
    ):
        raise _env_var_taken(env_var)


def _save(session: Session, row: Secret, changes: dict[str, Any]) -> None:
    """Apply ``changes`` to ``row`` (added first if new) in a savepoint. Losing a race with a concurrent
    request on a unique field answers 409, like the checks before it."""
    ident, user_id, name, env_var = row.id, row.user_id, row.name, changes.get("env_var", row.env_var)
    try:
        with session.begin_nested():
            if row not in session:
                session.add(row)
            for field, value in changes.items():
                setattr(row, field, value)
            session.flush()
    except IntegrityError:
        with session.no_autoflush:
            _check_unique(session, user_id, name=name, env_var=env_var, own=ident)
        raise Conflict("The secret clashes with another one", code="secret_name_taken") from None


def create_secret(
    session: Session,
    services: Services,
    user_id: str,
    *,
    name: str,
    secret: SecretValue,
    env_var: str,
    hosts: list[str] | None,
    comment: str | None,
) -> SecretView:
    name = _validated(validation.secret_name, name)
    env_var = _validated(validation.secret_env_var, env_var)
    norm_hosts = _validated(validation.secret_hosts, ["*"] if hosts is None else hosts)
    if comment is not None:
        comment = _validated(validation.comment, comment)
    _validated(validation.secret_value, secret.reveal())
    _check_unique(session, user_id, name=name, env_var=env_var, own="")
    now = services.clock.now()
    row = Secret(
        id=new_id(Prefix.SECRET),
        user_id=user_id,
        name=name,
        env_var=env_var,
        hosts=json.dumps(norm_hosts),
        ciphertext=b"",
        comment=comment,
        created_at=now,
        updated_at=now,
    )
    _save(session, row, {"ciphertext": services.cipher.encrypt(secret, _context(row))})
    return view(row)


def _get(session: Session, user_id: str, secret_id: str) -> Secret:
    row = None
    if has_prefix(secret_id, Prefix.SECRET):
        row = session.scalar(select(Secret).where(Secret.id == secret_id, Secret.user_id == user_id))
    if row is None:
        raise not_found("secret", secret_id)
    return row


def get_secret(session: Session, user_id: str, secret_id: str) -> SecretView:
    return view(_get(session, user_id, secret_id))


def list_secrets(
    session: Session, user_id: str, request: PageRequest, *, name: str | None
) -> Page[SecretView]:
    stmt = select(Secret).where(Secret.user_id == user_id)
    if name is not None:
        stmt = stmt.where(Secret.name == name)

    return paginate(
        session,
        stmt,
        request=request,
        sort_columns=_SORTS,
        id_column=Secret.id,
        render=view,
    )


def update_secret(
    session: Session,
    services: Services,
    user_id: str,
    secret_id: str,
    *,
    secret: SecretValue | None = _UNSET,
    env_var: str | None = _UNSET,
    hosts: list[str] | None = _UNSET,
    comment: str | None = _UNSET,
) -> SecretView:
    """Only the fields given change. ``comment=None`` clears the comment; the others cannot be null."""
    row = _get(session, user_id, secret_id)
    for field, value in (("secret", secret), ("env_var", env_var), ("hosts", hosts)):
        if value is None:
            raise ValidationFailed(f"{field} cannot be null")
    changes: dict[str, Any] = {}
    if env_var is not _UNSET:
        assert env_var is not None
        changes["env_var"] = _validated(validation.secret_env_var, env_var)
        _check_unique(session, user_id, name=None, env_var=changes["env_var"], own=row.id)
    if hosts is not _UNSET:
        assert hosts is not None
        changes["hosts"] = json.dumps(_validated(validation.secret_hosts, hosts))
    if comment is not _UNSET:
        changes["comment"] = None if comment is None else _validated(validation.comment, comment)
    if secret is not _UNSET:
        assert secret is not None
        _validated(validation.secret_value, secret.reveal())
        changes["ciphertext"] = services.cipher.encrypt(secret, _context(row))
    changes["updated_at"] = services.clock.now()
    _save(session, row, changes)
    return view(row)


def delete_secret(session: Session, user_id: str, secret_id: str) -> None:
    row = _get(session, user_id, secret_id)
    session.delete(row)
    session.flush()


def placeholder_env(session: Session, user_id: str) -> dict[str, str]:
    """What a sandbox's environment holds for its owner's secrets: each ``env_var`` set to the secret's
    placeholder (``proxy_value``), never its value."""
    rows = session.execute(select(Secret.env_var, Secret.name).where(Secret.user_id == user_id))
    return {env_var: proxy_value(name) for env_var, name in rows}


def reveal(session: Session, services: Services, user_id: str, secret_id: str) -> SecretValue:
    """The plaintext, for the egress proxy only: no API route calls this."""
    row = _get(session, user_id, secret_id)
    return services.cipher.decrypt(row.ciphertext, _context(row))
