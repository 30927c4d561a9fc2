"""A request's transaction is committed before its response is sent: what a 2xx says is already stored."""

from __future__ import annotations

from sqlalchemy import create_engine, text

from corral.store.db import normalise_url
from tests.support import Account, Server


def test_writes_are_visible_the_moment_the_response_arrives(server: Server, account: Account) -> None:
    engine = create_engine(normalise_url(server.database_url))
    user_id = str(account.user["id"])
    count = text("SELECT count(*) FROM env_vars WHERE user_id = :u AND key = :k")
    try:
        for n in range(30):
            key = f"TX_{n}"
            assert account.client.put(f"/v1/env/{key}", json={"value": "v"}).status_code == 200
            with engine.connect() as conn:
                assert conn.execute(count, {"u": user_id, "k": key}).scalar_one() == 1
            assert account.client.delete(f"/v1/env/{key}").status_code == 204
            with engine.connect() as conn:
                assert conn.execute(count, {"u": user_id, "k": key}).scalar_one() == 0
    finally:
        engine.dispose()
