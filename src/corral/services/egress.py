"""The account's egress policy (mode) and its allowlist rules."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.domain import validation
from corral.domain.clock import Clock
from corral.domain.errors import Conflict, ValidationFailed, not_found
from corral.domain.ids import Prefix, has_prefix, new_id
from corral.domain.pagination import ListSpec, Page, PageRequest
from corral.store.paging import SortColumns, paginate
from corral.store.tables import EgressPolicy, EgressRule


class Mode(StrEnum):
    ENFORCE = "enforce"
    WARN = "warn"


DEFAULT_MODE = Mode.ENFORCE
LIST_RULES = ListSpec(default_limit=50, max_limit=200, sorts=("created_at", "host"))
_HOST_KEY = func.coalesce(EgressRule.host, "")
_SORTS: SortColumns = {
    "created_at": (EgressRule.created_at, datetime),
    "host": (_HOST_KEY, str),
}


def get_mode(session: Session, user_id: str) -> Mode:
    row = session.get(EgressPolicy, user_id)
    return DEFAULT_MODE if row is None else Mode(row.mode)


def set_mode(session: Session, clock: Clock, user_id: str, mode: Mode) -> Mode:
    row = session.get(EgressPolicy, user_id)
    if row is None:
        try:
            with session.begin_nested():
                session.add(EgressPolicy(user_id=user_id, mode=mode.value, updated_at=clock.now()))
            return mode
        except IntegrityError:  # a concurrent first PUT made the row: ours is the later write
            row = session.get(EgressPolicy, user_id)
            assert row is not None
    row.mode = mode.value
    row.updated_at = clock.now()
    session.flush()
    return mode


@dataclass(frozen=True)
class NewRule:
    name: str | None
    host: str | None
    cidr: str | None
    comment: str | None


def _validated_rule(rule: NewRule) -> NewRule:
    if (rule.host is None) == (rule.cidr is None):
        raise ValidationFailed("Provide host or cidr, not both")
    try:
        return NewRule(
            name=None if rule.name is None else validation.rule_name(rule.name),
            host=None if rule.host is None else validation.host_pattern(rule.host, allow_any=False),
            cidr=None if rule.cidr is None else validation.cidr(rule.cidr),
            comment=None if rule.comment is None else validation.comment(rule.comment),
        )
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from None


def _name_taken(name: str) -> Conflict:
    return Conflict(f"An egress rule named {name} already exists", code="rule_name_taken")


def create_rule(session: Session, clock: Clock, user_id: str, rule: NewRule) -> EgressRule:
    rule = _validated_rule(rule)
    if rule.name is not None and session.scalar(
        select(EgressRule.id).where(EgressRule.user_id == user_id, EgressRule.name == rule.name)
    ):
        raise _name_taken(rule.name)
    row = EgressRule(
        id=new_id(Prefix.EGRESS_RULE),
        user_id=user_id,
        name=rule.name,
        host=rule.host,
        cidr=rule.cidr,
        comment=rule.comment,
        created_at=clock.now(),
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        raise _name_taken(rule.name or "") from None
    return row


def get_rule(session: Session, user_id: str, rule_id: str) -> EgressRule:
    row = None
    if has_prefix(rule_id, Prefix.EGRESS_RULE):
        row = session.scalar(
            select(EgressRule).where(EgressRule.id == rule_id, EgressRule.user_id == user_id)
        )
    if row is None:
        raise not_found("egress_rule", rule_id)
    return row


def delete_rule(session: Session, user_id: str, rule_id: str) -> None:
    session.delete(get_rule(session, user_id, rule_id))
    session.flush()


def list_rules(
    session: Session,
    user_id: str,
    request: PageRequest,
    *,
    host: str | None = None,
    cidr: str | None = None,
    name: str | None = None,
) -> Page[EgressRule]:
    stmt = select(EgressRule).where(EgressRule.user_id == user_id)
    if host is not None:
        stmt = stmt.where(EgressRule.host == host.lower())
    if cidr is not None:
        stmt = stmt.where(EgressRule.cidr == _canonical_cidr(cidr))
    if name is not None:
        stmt = stmt.where(EgressRule.name == name)

    return paginate(
        session,
        stmt,
        request=request,
        sort_columns=_SORTS,
        id_column=EgressRule.id,
        render=lambda r: r,
    )


def all_rules(session: Session, user_id: str) -> list[EgressRule]:
    """Every rule of the account, for the egress proxy's policy."""
    return list(session.scalars(select(EgressRule).where(EgressRule.user_id == user_id)))


def _canonical_cidr(text: str) -> str:
    """A filter value in the form rules are stored in; a value that is no network matches nothing."""
    try:
        return validation.cidr(text)
    except ValueError:
        return text
