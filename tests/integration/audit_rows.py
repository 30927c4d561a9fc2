"""Inserting audit events the way the egress proxy will: through the audit service, into the server's DB."""

from __future__ import annotations

from typing import Any

from corral.services.audit import NewEvent, record
from corral.store.db import make_engine, session_factory, transaction
from tests.support import Server


def insert_events(server: Server, user_id: str, events: list[dict[str, Any]]) -> list[str]:
    engine = make_engine(server.database_url)
    try:
        with transaction(session_factory(engine)) as session:
            return record(session, [NewEvent(user_id=user_id, **ev) for ev in events])
    finally:
        engine.dispose()
