"""The lockout's counts on a real database (SQLite and PostgreSQL): the count, the lock, its end, and counts
whose window is over are deleted (names guessed once do not pile up)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from corral.services import lockout
from corral.store.db import transaction
from corral.store.tables import LoginFailures

POLICY = lockout.LockoutPolicy(max_failures=2, window=timedelta(minutes=10), lockout=timedelta(minutes=5))


def _try(sessions: sessionmaker[Session], now: datetime, email: str) -> int:
    with transaction(sessions) as session:
        return lockout.attempt(session, now, email, POLICY)


def _rows(sessions: sessionmaker[Session], *emails: str) -> int:
    hashes = [lockout.name_hash(e) for e in emails]
    with transaction(sessions) as session:
        return (
            session.scalar(
                select(func.count()).select_from(LoginFailures).where(LoginFailures.email_hash.in_(hashes))
            )
            or 0
        )


def test_counts_locks_and_forgetting(sessions: sessionmaker[Session]) -> None:
    now = datetime.now(UTC)
    email, once = f"a-{secrets.token_hex(4)}@example.com", f"b-{secrets.token_hex(4)}@example.com"
    assert [_try(sessions, now, email) for _ in range(3)] == [0, 0, 300]
    assert _try(sessions, now + timedelta(seconds=100), email.upper()) == 200  # the same name, any case
    assert _try(sessions, now, once) == 0
    # the lock is over: counting starts again
    assert _try(sessions, now + timedelta(minutes=6), email) == 0
    # a window later, the name tried once is forgotten by the next try of any name; a live lock is kept
    later = now + timedelta(minutes=11)
    assert [_try(sessions, later, email) for _ in range(2)] == [0, 300]
    assert _rows(sessions, once) == 0
    assert _rows(sessions, email) == 1
    with transaction(sessions) as session:
        lockout.succeeded(session, email)
    assert _rows(sessions, email) == 0
