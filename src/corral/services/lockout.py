"""Per-account lockout of password logins (``/activate``, password change).

Every password attempt for an account name is counted before the password is checked, in the caller's
transaction (a row lock on PostgreSQL, the write lock on SQLite), so parallel guesses cannot slip past the
count. More than ``max_failures`` attempts without a success within ``window`` lock the name for ``lockout``;
a success clears the count. Names are kept as a hash of the normalised email and counted whether or not an
account has that email, so a locked answer tells nothing about which emails exist; a locked attempt checks no
password, for known and unknown names alike. Kept in the database: a restart does not unlock.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.store.tables import LoginFailures


@dataclass(frozen=True)
class LockoutPolicy:
    max_failures: int = 5
    window: timedelta = timedelta(minutes=15)
    lockout: timedelta = timedelta(minutes=15)


def name_hash(email: str) -> str:
    return hashlib.sha256(email.strip().lower().encode("utf-8", "surrogatepass")).hexdigest()


def _wait(until: datetime, now: datetime) -> int:
    return max(1, math.ceil((until - now).total_seconds()))


def attempt(session: Session, now: datetime, email: str, policy: LockoutPolicy) -> int:
    """Count one password attempt for ``email``: 0 to go ahead, else the seconds until it may try again."""
    key = name_hash(email)
    _forget_stale(session, now, policy)
    for _ in range(2):  # a concurrent first attempt for the same name: the second pass finds its row
        row = session.get(LoginFailures, key, with_for_update=True)
        if row is None:
            try:
                with session.begin_nested():
                    session.add(LoginFailures(email_hash=key, failures=1, window_start=now))
            except IntegrityError:
                continue
            return 0
        if row.locked_until is not None and row.locked_until > now:
            return _wait(row.locked_until, now)
        if row.locked_until is not None or now - row.window_start >= policy.window:
            row.failures, row.window_start, row.locked_until = 1, now, None
        else:
            row.failures += 1
            if row.failures > policy.max_failures:
                row.locked_until = now + policy.lockout
                session.flush()
                return _wait(row.locked_until, now)
        session.flush()
        return 0
    raise RuntimeError("login attempt count did not converge")


def _forget_stale(session: Session, now: datetime, policy: LockoutPolicy) -> None:
    """Counts whose window and lock are over hold nothing: gone, so guessed names do not pile up."""
    session.execute(
        delete(LoginFailures).where(
            LoginFailures.window_start <= now - policy.window,
            or_(LoginFailures.locked_until.is_(None), LoginFailures.locked_until <= now),
        )
    )


def succeeded(session: Session, email: str) -> None:
    """A right password: the name's count starts again."""
    session.execute(delete(LoginFailures).where(LoginFailures.email_hash == name_hash(email)))
