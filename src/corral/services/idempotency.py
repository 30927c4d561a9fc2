"""Idempotency keys: the first answer to a create, kept a day per (account, key), replayed to its retries.

A request with an ``Idempotency-Key`` first claims the key (a committed row, ``started``); its answer is then
stored on the row (``done``) and replayed, status and body, to every later request with the same key and the
same method, path and body. A different request with a used key is refused (``idempotency_key_reuse``); a
retry while the first still runs is refused too (``idempotency_key_in_use``), so concurrent duplicates cannot
create twice. Only answers that settle the request are kept (2xx, and 404 and 409); anything else (a
validation error, a rate limit, a server error) lets the claim go, so a retry runs the request again. A claim
left by a server process that is gone (a crash between the claim and the stored answer) is taken over by
the retry, which runs the request again.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from corral.store.db import transaction
from corral.store.tables import IdempotencyKey

KEEP = timedelta(hours=24)
MAX_KEY_CHARS = 255
MAX_STORED_BYTES = 1024 * 1024
# the server process that runs a claimed request: a claim of another process is one a restart interrupted
INSTANCE = secrets.token_hex(8)


def canonical(body: bytes) -> bytes:
    """A JSON body as its value (key order and spacing do not make another request); other bodies as sent."""
    try:
        value = json.loads(body)
    except ValueError:
        return body
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def fingerprint(method: str, path: str, query: bytes, body: bytes) -> str:
    """The request a key stands for: method, path, query and the body's value."""
    body = canonical(body)
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query, body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def valid_key(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_CHARS and key.isascii() and key.isprintable()


def keeps(status: int) -> bool:
    """Whether an answer settles the request (kept and replayed) or lets the key be tried again."""
    return 200 <= status < 300 or status in (404, 409)


class Outcome(StrEnum):
    RUN = "run"  # the key is ours: run the request, then store or release
    REPLAY = "replay"
    REUSED = "reused"  # the key was used for another request
    IN_USE = "in_use"  # the first request with it still runs


@dataclass(frozen=True)
class Claim:
    outcome: Outcome
    status: int | None = None
    content_type: str | None = None
    body: bytes | None = None


def claim(sessions: sessionmaker[Session], now: datetime, user_id: str, key: str, fp: str) -> Claim:
    with transaction(sessions) as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < now - KEEP))
    for _ in range(3):
        with transaction(sessions) as session:
            row = session.get(IdempotencyKey, (user_id, key), with_for_update=True)
            if row is None:
                try:
                    with session.begin_nested():
                        session.add(
                            IdempotencyKey(
                                user_id=user_id,
                                key=key,
                                fingerprint=fp,
                                state="started",
                                owner=INSTANCE,
                                created_at=now,
                            )
                        )
                except IntegrityError:
                    continue
                return Claim(Outcome.RUN)
            if row.fingerprint != fp:
                return Claim(Outcome.REUSED)
            if row.state == "done":
                return Claim(Outcome.REPLAY, row.status_code, row.content_type, row.body)
            if row.owner == INSTANCE:
                return Claim(Outcome.IN_USE)
            row.owner = INSTANCE  # its server is gone: this retry runs the request again
            row.created_at = now
            return Claim(Outcome.RUN)
    raise RuntimeError("idempotency claim did not converge")


def store(
    sessions: sessionmaker[Session], user_id: str, key: str, status: int, content_type: str, body: bytes
) -> None:
    with transaction(sessions) as session:
        session.execute(
            update(IdempotencyKey)
            .where(
                IdempotencyKey.user_id == user_id,
                IdempotencyKey.key == key,
                IdempotencyKey.owner == INSTANCE,
            )
            .values(state="done", status_code=status, content_type=content_type, body=body)
        )


def release(sessions: sessionmaker[Session], user_id: str, key: str) -> None:
    with transaction(sessions) as session:
        session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.user_id == user_id,
                IdempotencyKey.key == key,
                IdempotencyKey.state == "started",
                IdempotencyKey.owner == INSTANCE,
            )
        )
