"""A secret's value appears in no response, no log line, and not in the database in clear."""

from __future__ import annotations

from sqlalchemy import create_engine, text

from corral.store.db import normalise_url
from tests.support import Account, Server


def test_secret_value_is_only_ever_stored_encrypted(server: Server, account: Account) -> None:
    value = "ghp_hygiene-check-0123456789abcdef"
    bodies = []
    created = account.client.post(
        "/v1/secrets", json={"name": "hygiene", "secret": value, "env_var": "HYGIENE"}
    )
    assert created.status_code == 201
    sid = created.json()["id"]
    bodies.append(created.text)
    bodies.append(account.client.get(f"/v1/secrets/{sid}").text)
    bodies.append(account.client.get("/v1/secrets").text)
    bodies.append(account.client.patch(f"/v1/secrets/{sid}", json={"secret": value + "-2"}).text)
    # errors caused by the secret field itself do not echo it either
    bodies.append(
        account.client.post("/v1/secrets", json={"name": "h2", "secret": 12345, "env_var": "H2"}).text
    )
    bodies.append(
        account.client.post("/v1/secrets", json={"name": "h!", "secret": value, "env_var": "H3"}).text
    )
    for body in bodies:
        assert value not in body

    engine = create_engine(normalise_url(server.database_url))
    try:
        with engine.connect() as conn:
            blob = conn.execute(
                text("SELECT ciphertext FROM secrets WHERE id = :id"), {"id": sid}
            ).scalar_one()
    finally:
        engine.dispose()
    assert value.encode() not in bytes(blob)
    assert value not in server.log.read_text(errors="replace")

    key_file = server.data_dir / "secret.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (
        server.data_dir.stat().st_mode & 0o777 == 0o711
    )  # passable (sandbox roots live below), not listable
    for db_file in server.data_dir.glob("*.db*"):
        assert db_file.stat().st_mode & 0o777 == 0o600, db_file
