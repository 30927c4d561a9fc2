"""Accounts and API keys."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from corral.domain import validation
from corral.domain.clock import Clock
from corral.domain.errors import Conflict, NotFound, RateLimited, ValidationFailed
from corral.domain.ids import Prefix, new_id
from corral.domain.pagination import ListSpec, Page, PageRequest
from corral.security.passwords import hash_password, verify_password
from corral.security.tokens import TOKEN_PREFIX, hash_token, looks_like_token, new_token
from corral.services import lockout
from corral.store.db import transaction
from corral.store.paging import SortColumns, paginate
from corral.store.tables import ApiKey, User

# a key's last use is written at most this often (one small UPDATE per key and minute, not one per request)
LAST_USED_RESOLUTION = timedelta(minutes=1)
PREFIX_CHARS = len(TOKEN_PREFIX) + 4  # corral_live_AbCd: tells keys apart, 24 of the token's 256 bits
KEY_LIST = ListSpec(default_limit=50, max_limit=200, sorts=("created_at",))
_KEY_SORTS: SortColumns = {"created_at": (ApiKey.created_at, datetime)}


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
    last_used_at: datetime | None = None  # as stored before this request


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
        prefix=token[:PREFIX_CHARS],
        created_at=clock.now(),
    )
    session.add(key)
    session.flush()
    return IssuedKey(key=key, token=token)


def authenticate(session: Session, token: str) -> Principal | None:
    if not looks_like_token(token):
        return None
    row = session.execute(
        select(ApiKey.id, ApiKey.user_id, ApiKey.last_used_at).where(
            ApiKey.token_hash == hash_token(token), ApiKey.revoked_at.is_(None)
        )
    ).first()
    if row is None:
        return None
    return Principal(user_id=row.user_id, key_id=row.id, last_used_at=row.last_used_at)


def needs_touch(who: Principal, now: datetime) -> bool:
    return who.last_used_at is None or now - who.last_used_at >= LAST_USED_RESOLUTION


def touch(session: Session, key_id: str, now: datetime) -> None:
    """Record a use of the key, unless one was recorded within the last minute (also by another request)."""
    session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == key_id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= now - LAST_USED_RESOLUTION),
        )
        .values(last_used_at=now)
    )


# ---- the caller's keys ----------------------------------------------------------------------------------


def _key_not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key with ID {key_id}", code="api_key_not_found")


def list_keys(session: Session, user_id: str, request: PageRequest) -> Page[ApiKey]:
    """The account's keys that are not revoked."""
    stmt = select(ApiKey).where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
    return paginate(
        session, stmt, request=request, sort_columns=_KEY_SORTS, id_column=ApiKey.id, render=lambda r: r
    )


def create_key(session: Session, clock: Clock, user_id: str, name: str) -> IssuedKey:
    name = name.strip()
    if not name or len(name) > 100:
        raise ValidationFailed("name must be 1 to 100 characters")
    return issue_key(session, clock, user_id, name=name)


def revoke_key(session: Session, clock: Clock, user_id: str, key_id: str) -> None:
    """Revoke one of the account's keys: the next request with it answers 401."""
    done = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=clock.now())
    )
    if not done.rowcount:  # type: ignore[attr-defined]
        raise _key_not_found(key_id)


def change_password(
    sessions: sessionmaker[Session],
    clock: Clock,
    who: Principal,
    *,
    current: str,
    new: str,
    policy: lockout.LockoutPolicy,
) -> int:
    """Set a new password after checking the current one; every other key of the account is revoked (the
    caller's stays). Each try counts towards the account's lockout, committed before the password is checked
    (a wrong one rolls nothing back); no lock is held while it is. Answers how many keys were revoked."""
    try:
        new = validation.password(new)
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from None
    with transaction(sessions) as session:
        user = get_user(session, who.user_id)
        email, old_hash = user.email, user.password_hash
        wait = lockout.attempt(session, clock.now(), email, policy)
    if wait:
        raise RateLimited(f"Too many wrong passwords; retry in {wait} s", retry_after=wait)
    if not verify_password(old_hash, current):
        raise ValidationFailed("current_password is wrong", code="wrong_password")
    new_hash = hash_password(new)
    with transaction(sessions) as session:
        lockout.succeeded(session, email)
        changed = session.execute(
            update(User)
            .where(User.id == who.user_id, User.password_hash == old_hash)
            .values(password_hash=new_hash)
        )
        if not changed.rowcount:  # type: ignore[attr-defined]
            raise Conflict("The password was changed meanwhile; try again", code="password_changed")
        revoked = session.execute(
            update(ApiKey)
            .where(ApiKey.user_id == who.user_id, ApiKey.id != who.key_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=clock.now())
        )
    return int(revoked.rowcount)  # type: ignore[attr-defined]


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
