"""API keys can be listed (with last use), created and revoked at once; a password change revokes the account's
other keys (finding M4). Against a real ``corral serve`` on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import update

import corral
from corral.store.db import make_engine, session_factory, transaction
from corral.store.tables import ApiKey
from tests.support import Account, Server, running_server, signup


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("keys")) as srv:
        yield srv


def _new_key(acct: Account, name: str) -> dict[str, str]:
    resp = acct.client.post("/v1/api-keys", json={"name": name})
    assert resp.status_code == 201, resp.text
    body: dict[str, str] = resp.json()
    assert set(body) == {"id", "name", "token", "created_at"}
    return body


def _set_last_used(server: Server, key_id: str, when: datetime) -> None:
    engine = make_engine(server.database_url)
    try:
        with transaction(session_factory(engine)) as session:
            session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when))
    finally:
        engine.dispose()


def test_list_create_and_last_use(server: Server) -> None:
    alice = signup(server)
    ci = _new_key(alice, "ci")
    listed = alice.client.get("/v1/api-keys")
    assert listed.status_code == 200, listed.text
    keys = {k["id"]: k for k in listed.json()["data"]}
    assert len(keys) == 2
    mine = next(k for k in keys.values() if k["current"])
    assert mine["name"] == "CLI"
    assert alice.token.startswith(mine["prefix"])
    assert len(mine["prefix"]) == len("corral_live_") + 4
    assert mine["last_used_at"] is not None  # this very request
    assert keys[ci["id"]] == {
        "id": ci["id"],
        "name": "ci",
        "prefix": ci["token"][: len(mine["prefix"])],
        "created_at": ci["created_at"],
        "last_used_at": None,  # never used yet
        "current": False,
    }
    assert "token" not in listed.text
    assert alice.token not in listed.text
    assert ci["token"] not in listed.text

    # newest first, paged like every list
    first = alice.client.get("/v1/api-keys", params={"limit": 1}).json()
    assert [k["id"] for k in first["data"]] == [ci["id"]]
    assert first["has_more"] is True
    second = alice.client.get("/v1/api-keys", params={"limit": 1, "cursor": first["cursor"]}).json()
    assert [k["id"] for k in second["data"]] == [mine["id"]]
    assert second["has_more"] is False

    # the last use is written at most once a minute: a use within the minute leaves it, an older one moves it
    with server.client(ci["token"]) as as_ci:
        assert as_ci.get("/v1/users/me").status_code == 200
        used = {k["id"]: k for k in as_ci.get("/v1/api-keys").json()["data"]}[ci["id"]]
        assert used["last_used_at"] is not None
        assert used["current"] is True
        assert {k["id"]: k for k in as_ci.get("/v1/api-keys").json()["data"]}[ci["id"]] == used
        _set_last_used(server, ci["id"], datetime.now(UTC) - timedelta(minutes=5))
        assert as_ci.get("/v1/users/me").status_code == 200
        moved = {k["id"]: k for k in as_ci.get("/v1/api-keys").json()["data"]}[ci["id"]]
        assert moved["last_used_at"] >= used["last_used_at"]
        stale = (datetime.now(UTC) - timedelta(minutes=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert moved["last_used_at"] > stale
    alice.client.close()


def test_revoke_is_immediate_and_scoped(server: Server) -> None:
    alice, bob = signup(server), signup(server)
    spare = _new_key(alice, "spare")
    with server.client(spare["token"]) as as_spare:
        assert as_spare.get("/v1/env").status_code == 200
        assert alice.client.delete(f"/v1/api-keys/{spare['id']}").status_code == 204
        refused = as_spare.get("/v1/env")  # the next request, on the same connection
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"
    assert spare["id"] not in {k["id"] for k in alice.client.get("/v1/api-keys").json()["data"]}
    # revoked, unknown and another account's keys are all simply not found
    for key_id in (spare["id"], "key_doesnotexist", _new_key(bob, "bobs")["id"]):
        gone = alice.client.delete(f"/v1/api-keys/{key_id}")
        assert gone.status_code == 404, gone.text
        assert gone.json() == {
            "error": {"code": "api_key_not_found", "message": f"No API key with ID {key_id}"}
        }
    assert len(bob.client.get("/v1/api-keys").json()["data"]) == 2
    # bad names
    for name in ("", "x" * 101):
        bad = alice.client.post("/v1/api-keys", json={"name": name})
        assert bad.status_code == 422
        assert bad.json()["error"]["code"] == "validation_error"
    # a key may revoke itself
    own = next(k for k in alice.client.get("/v1/api-keys").json()["data"] if k["current"])
    assert alice.client.delete(f"/v1/api-keys/{own['id']}").status_code == 204
    assert alice.client.get("/v1/env").status_code == 401
    alice.client.close()
    bob.client.close()


def test_password_change_revokes_the_other_keys(server: Server) -> None:
    alice = signup(server)
    others = [_new_key(alice, f"k{i}") for i in range(2)]
    new_password = f"n3w-{secrets.token_hex(8)}"
    wrong = alice.client.post(
        "/v1/users/me/password", json={"current_password": "not-it-at-all", "new_password": new_password}
    )
    assert wrong.status_code == 422
    assert wrong.json()["error"]["code"] == "wrong_password"
    short = alice.client.post(
        "/v1/users/me/password", json={"current_password": alice.password, "new_password": "short"}
    )
    assert short.status_code == 422
    assert short.json()["error"]["code"] == "validation_error"
    for key in others:  # nothing changed yet
        with server.client(key["token"]) as c:
            assert c.get("/v1/users/me").status_code == 200
    done = alice.client.post(
        "/v1/users/me/password", json={"current_password": alice.password, "new_password": new_password}
    )
    assert done.status_code == 200, done.text
    assert done.json() == {"revoked_keys": 2}
    for key in others:
        with server.client(key["token"]) as c:
            assert c.get("/v1/users/me").status_code == 401
    assert alice.client.get("/v1/users/me").status_code == 200  # the caller's key stays
    assert [k["current"] for k in alice.client.get("/v1/api-keys").json()["data"]] == [True]
    # the new password is the one now: the old one is wrong, the new one works
    again = alice.client.post(
        "/v1/users/me/password", json={"current_password": alice.password, "new_password": "whatever-123"}
    )
    assert again.status_code == 422
    back = alice.client.post(
        "/v1/users/me/password", json={"current_password": new_password, "new_password": alice.password}
    )
    assert back.json() == {"revoked_keys": 0}
    assert "s3cureP@ssword" not in server.log.read_text()
    assert new_password not in server.log.read_text()
    alice.client.close()


def test_sdk_and_openapi(server: Server) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"get", "post"} <= set(spec["paths"]["/v1/api-keys"])
    assert "delete" in spec["paths"]["/v1/api-keys/{key_id}"]
    assert "404" in spec["paths"]["/v1/api-keys/{key_id}"]["delete"]["responses"]
    assert "422" in spec["paths"]["/v1/users/me/password"]["post"]["responses"]


def _cli(
    server: Server, token: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_API_KEY": token, "XDG_CONFIG_HOME": "/nonexistent"}
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_sdk_methods(server: Server) -> None:
    alice = signup(server)
    with corral.Client(alice.token, server.url) as client:
        made = client.api_keys.create("sdk")
        listed = client.api_keys.list()
        assert {k.id for k in listed.data} == {made.id, next(k.id for k in listed.data if k.current)}
        assert [k.id for k in client.api_keys.iter(limit=1)] == [k.id for k in listed.data]
        client.api_keys.revoke(made.id)
        with (
            corral.Client(made.token, server.url, max_retries=0) as revoked,
            pytest.raises(corral.AuthenticationError),
        ):
            revoked.users.me()
        changed = client.users.change_password(current_password=alice.password, new_password="an0ther-pass")
        assert changed.revoked_keys == 0
    alice.client.close()


def test_cli_commands(server: Server) -> None:
    alice = signup(server)
    made = _cli(server, alice.token, "key", "create", "from-cli")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("corral_live_")
    listing = _cli(server, token, "key", "list")
    assert listing.returncode == 0, listing.stderr
    assert "from-cli" in listing.stdout
    assert "CLI" in listing.stdout
    assert token not in listing.stdout
    key_id = next(k["id"] for k in alice.client.get("/v1/api-keys").json()["data"] if k["name"] == "from-cli")
    revoked = _cli(server, alice.token, "key", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert (
        httpx.get(f"{server.url}/v1/users/me", headers={"Authorization": f"Bearer {token}"}).status_code
        == 401
    )
    gone = _cli(server, alice.token, "key", "revoke", key_id)
    assert gone.returncode != 0
    assert "api_key_not_found" in gone.stdout + gone.stderr
    other = _new_key(alice, "other")
    changed = _cli(
        server,
        alice.token,
        "password",
        "--current",
        alice.password,
        stdin="n3w-pass-word\nn3w-pass-word\n",
    )
    assert changed.returncode == 0, changed.stderr
    assert "1 other API key(s) revoked" in changed.stdout
    assert (
        httpx.get(f"{server.url}/v1/env", headers={"Authorization": f"Bearer {other['token']}"}).status_code
        == 401
    )
    alice.client.close()
