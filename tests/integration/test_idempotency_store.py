"""The idempotency claims on a real database (SQLite and PostgreSQL): one claim per key among racing
requests, replay of a stored answer, a claim left by a server that is gone is taken over, expiry."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from corral.domain.clock import SystemClock
from corral.services import idempotency, users
from corral.services.idempotency import Outcome
from corral.store.db import transaction
from corral.store.tables import IdempotencyKey


def _user(sessions: sessionmaker[Session]) -> str:
    with transaction(sessions) as session:
        user, _ = users.signup(
            session,
            SystemClock(),
            first_name="Idem",
            last_name="Potent",
            email=f"idem-{secrets.token_hex(6)}@example.com",
            password="s3cureP@ssword",
        )
        return user.id


def test_claims(sessions: sessionmaker[Session]) -> None:
    user_id = _user(sessions)
    now = datetime.now(UTC)
    fp = idempotency.fingerprint("POST", "/v1/vms", b"", b'{"b": 1, "a": 2}')
    assert fp == idempotency.fingerprint("POST", "/v1/vms", b"", b'{"a":2,"b":1}')
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(
            pool.map(lambda _: idempotency.claim(sessions, now, user_id, "k1", fp).outcome, range(8))
        )
    assert sorted(outcomes) == sorted([Outcome.RUN] + [Outcome.IN_USE] * 7)
    assert idempotency.claim(sessions, now, user_id, "k1", "other").outcome is Outcome.REUSED
    idempotency.store(sessions, user_id, "k1", 201, "application/json", b'{"id":"vm_1"}')
    replay = idempotency.claim(sessions, now, user_id, "k1", fp)
    assert (replay.outcome, replay.status, replay.body) == (Outcome.REPLAY, 201, b'{"id":"vm_1"}')

    # a claim of a server process that is gone (it crashed before storing the answer) is taken over
    assert idempotency.claim(sessions, now, user_id, "k2", fp).outcome is Outcome.RUN
    with transaction(sessions) as session:
        session.execute(update(IdempotencyKey).where(IdempotencyKey.key == "k2").values(owner="gone"))
    assert idempotency.claim(sessions, now, user_id, "k2", fp).outcome is Outcome.RUN
    assert idempotency.claim(sessions, now, user_id, "k2", fp).outcome is Outcome.IN_USE
    # released (an answer not kept): the key is free again
    idempotency.release(sessions, user_id, "k2")
    assert idempotency.claim(sessions, now, user_id, "k2", "another").outcome is Outcome.RUN
    # a day later every key is free
    later = now + idempotency.KEEP + timedelta(seconds=1)
    assert idempotency.claim(sessions, later, user_id, "k1", "new").outcome is Outcome.RUN
