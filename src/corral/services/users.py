"""Accounts and API keys."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.domain import validation
from corral.domain.clock import Clock
from corral.domain.errors import Conflict, NotFound
from corral.domain.ids import Prefix, new_id
from corral.security.passwords import hash_password, verify_password
from corral.security.tokens import hash_token, looks_like_token, new_token
from corral.store.tables import ApiKey, User


@dataclass(frozen=True)
class IssuedKey:
    key: ApiKey
    token: str  # shown once, never stored

    def __repr__(self) -> str:
        return f"IssuedKey(key={self.key.id!r}, token='**********')"


@dataclass(frozen=True)
class Principal:
    user_id: str
    key_id: str


def email_taken() -> Conflict:
    return Conflict("An account with this email already exists", code="email_taken")


def signup(
    session: Session, clock: Clock, *, first_name: str, last_name: str, email: str, password: str
) -> tuple[User, IssuedKey]:
    email = validation.email(email)
    if session.scalar(select(User.id).where(User.email == email)) is not None:
        raise email_taken()
    now = clock.now()
    user = User(
        id=new_id(Prefix.USER),
        first_name=validation.person_name(first_name, "first_name"),
        last_name=validation.person_name(last_name, "last_name"),
        email=email,
        password_hash=hash_password(validation.password(password)),
        email_verified=False,
        created_at=now,
    )
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        raise email_taken() from None
    return user, issue_key(session, clock, user.id, name="CLI")


def issue_key(session: Session, clock: Clock, user_id: str, *, name: str) -> IssuedKey:
    token = new_token()
    key = ApiKey(
        id=new_id(Prefix.API_KEY),
        user_id=user_id,
        name=name,
        token_hash=hash_token(token),
        created_at=clock.now(),
    )
    session.add(key)
    session.flush()
    return IssuedKey(key=key, token=token)


def authenticate(session: Session, token: str) -> Principal | None:
    if not looks_like_token(token):
        return None
    row = session.execute(
        select(ApiKey.id, ApiKey.user_id).where(
            ApiKey.token_hash == hash_token(token), ApiKey.revoked_at.is_(None)
        )
    ).first()
    return None if row is None else Principal(user_id=row.user_id, key_id=row.id)


def check_password(session: Session, email: str, password: str) -> User | None:
    try:
        email = validation.email(email)
    except ValueError:
        return None
    user = session.scalar(select(User).where(User.email == email))
    if user is None:
        verify_password(_dummy_hash(), password)  # same time whether or not the account exists
        return None
    return user if verify_password(user.password_hash, password) else None


def get_user(session: Session, user_id: str) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound("No user with this key", code="user_not_found")
    return user


@cache
def _dummy_hash() -> str:
    return hash_password("corral-timing-equaliser")
