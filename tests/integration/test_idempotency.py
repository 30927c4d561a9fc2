"""``Idempotency-Key`` on creates (finding D7): a retry of a create whose answer was lost gets the first answer
(the same VM, one VM only), the same key with another body is refused, and concurrent duplicates create one
thing. Against real servers on SQLite and PostgreSQL: a node server for VMs, an API server for the rest.

Before: the header was ignored; the retry of a named create answered 409 vm_name_taken, of an unnamed one made
a second VM.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

import corral
from tests.support import Account, Server, node_server, running_server, signup, wait_until
from tests.vmtools import destroy, public_key, unique_name, wait_detail


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with node_server(tmp_path_factory.mktemp("idem-node"), CORRAL_NETWORK="off", CORRAL_SSH="off") as srv:
        yield srv


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("idem-api")) as srv:
        yield srv


def _send_raw(server: Server, token: str, path: str, body: dict[str, Any], key: str) -> socket.socket:
    """Send the request whole on a connection of its own; its answer is never read."""
    where = urlsplit(server.url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\nAuthorization: Bearer {token}\r\n"
        f"Idempotency-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((where.hostname or "127.0.0.1", where.port or 80), timeout=30)
    sock.sendall(head + payload)
    return sock


def _vms(acct: Account) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = acct.client.get("/v1/vms", params={"limit": 100}).json()["data"]
    return data


def test_a_lost_create_answer_is_replayed_not_made_twice(node: Server) -> None:
    alice = signup(node)
    key = f"create-{secrets.token_hex(8)}"
    body = {"name": unique_name(), "public_key": public_key()}
    lost = _send_raw(node, alice.token, "/v1/vms", body, key)
    try:
        wait_until(lambda: len(_vms(alice)) == 1, timeout=30)  # the first request did its work...
    finally:
        lost.close()  # ...and its answer is lost
    # the retry, until the first has answered (409 idempotency_key_in_use while it runs)
    for _ in range(200):
        retry = alice.client.post("/v1/vms", json=body, headers={"Idempotency-Key": key})
        if retry.status_code != 409:
            break
        assert retry.json()["error"]["code"] == "idempotency_key_in_use", retry.text
        assert retry.headers["Retry-After"] == "1"
    assert retry.status_code == 201, retry.text
    assert retry.headers["Idempotent-Replayed"] == "true"
    vm = retry.json()
    assert vm["name"] == body["name"]
    assert [v["id"] for v in _vms(alice)] == [vm["id"]]  # one VM only
    again = alice.client.post("/v1/vms", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 201
    assert again.json() == vm  # the first answer, as it was (status "pending")
    # the same key with another request: refused, nothing made
    other = alice.client.post(
        "/v1/vms", json={**body, "name": unique_name()}, headers={"Idempotency-Key": key}
    )
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reuse"
    # without the header, the name is taken as before
    plain = alice.client.post("/v1/vms", json=body)
    assert plain.status_code == 409
    assert plain.json()["error"]["code"] == "vm_name_taken"
    assert len(_vms(alice)) == 1
    assert wait_detail(alice.client, vm["id"])["status_detail"] == "ready"
    destroy(alice.client, vm["id"])
    alice.client.close()


def test_concurrent_duplicates_create_one_vm(node: Server) -> None:
    alice = signup(node)
    key = f"burst-{secrets.token_hex(8)}"
    body = {"name": unique_name(), "public_key": public_key()}

    def create(_: int) -> httpx.Response:
        with node.client(alice.token) as c:
            return c.post("/v1/vms", json=body, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(create, range(8)))
    made = [a for a in answers if a.status_code == 201]
    assert made, [a.text for a in answers]
    assert {a.json()["id"] for a in made} == {made[0].json()["id"]}
    for refused in (a for a in answers if a.status_code != 201):
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "idempotency_key_in_use"
    vms = _vms(alice)
    assert [v["id"] for v in vms] == [made[0].json()["id"]]
    wait_detail(alice.client, vms[0]["id"])
    destroy(alice.client, vms[0]["id"])
    alice.client.close()


def test_other_creates_and_what_is_not_kept(api: Server) -> None:
    alice, bob = signup(api), signup(api)
    key = "same-key-for-everyone"
    secret = {"name": "gh", "secret": "ghp_idempotent", "env_var": "GH_TOKEN", "hosts": ["api.github.com"]}
    first = alice.client.post("/v1/secrets", json=secret, headers={"Idempotency-Key": key})
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    replay = alice.client.post("/v1/secrets", json=secret, headers={"Idempotency-Key": key})
    assert (replay.status_code, replay.json()) == (201, first.json())
    assert len(alice.client.get("/v1/secrets").json()["data"]) == 1
    # keys are per account: bob's same key is his own
    assert bob.client.post("/v1/secrets", json=secret, headers={"Idempotency-Key": key}).status_code == 201
    # the same key on another path is another request
    rule = alice.client.post(
        "/v1/egress/rules", json={"host": "example.org"}, headers={"Idempotency-Key": key}
    )
    assert rule.status_code == 422
    assert rule.json()["error"]["code"] == "idempotency_key_reuse"
    # a validation error is not kept: the corrected retry with the same key runs
    fresh = f"k-{secrets.token_hex(6)}"
    bad = alice.client.post("/v1/egress/rules", json={"host": ""}, headers={"Idempotency-Key": fresh})
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "validation_error"
    again = alice.client.post("/v1/egress/rules", json={"host": ""}, headers={"Idempotency-Key": fresh})
    assert again.status_code == 422
    assert "Idempotent-Replayed" not in again.headers
    # a bad key, and a wrong API key (the route's own 401, nothing claimed)
    long = alice.client.post("/v1/secrets", json=secret, headers={"Idempotency-Key": "x" * 256})
    assert long.status_code == 400
    assert long.json()["error"]["code"] == "invalid_parameter"
    with api.client("corral_live_not-a-real-key-000000000000") as stranger:
        assert stranger.post("/v1/secrets", json=secret, headers={"Idempotency-Key": key}).status_code == 401
    alice.client.close()
    bob.client.close()


def test_a_stored_answer_is_kept_one_day(api: Server) -> None:
    """A stored answer is kept 24 hours: older ones are gone and the key is free again."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from corral.store.db import make_engine, session_factory, transaction
    from corral.store.tables import IdempotencyKey

    alice = signup(api)
    key = f"old-{secrets.token_hex(6)}"
    made = alice.client.post("/v1/api-keys", json={"name": "one"}, headers={"Idempotency-Key": key})
    assert made.status_code == 201
    engine = make_engine(api.database_url)
    try:
        with transaction(session_factory(engine)) as session:
            session.execute(
                update(IdempotencyKey)
                .where(IdempotencyKey.key == key)
                .values(created_at=datetime.now(UTC) - timedelta(hours=25))
            )
    finally:
        engine.dispose()
    later = alice.client.post("/v1/api-keys", json={"name": "one"}, headers={"Idempotency-Key": key})
    assert later.status_code == 201
    assert later.json()["id"] != made.json()["id"]
    alice.client.close()


def test_openapi_documents_the_header(api: Server) -> None:
    spec = httpx.get(f"{api.url}/openapi.json").json()
    for path in ("/v1/vms", "/v1/secrets", "/v1/egress/rules", "/v1/api-keys", "/v1/vms/{vm_id}/snapshots"):
        op = spec["paths"][path]["post"]
        assert "Idempotency-Key" in [p["name"] for p in op["parameters"]], path
        assert {"409", "422"} <= set(op["responses"]), path
    assert "Idempotency-Key" not in str(spec["paths"]["/v1/vms/{vm_id}/exec"])


def test_the_sdk_sends_its_key(node: Server) -> None:
    alice = signup(node)
    name, key = unique_name(), f"sdk-{secrets.token_hex(6)}"
    with corral.Client(alice.token, node.url) as client:
        first = client.vms.create(name=name, public_key=public_key(), idempotency_key=key)
        again = client.vms.create(name=name, public_key=public_key(), idempotency_key=key)
        assert again.id == first.id
        with pytest.raises(corral.ConflictError):  # a new key: a new request, and the name is taken
            client.vms.create(name=name, public_key=public_key())
    assert [v["id"] for v in _vms(alice)] == [first.id]
    wait_detail(alice.client, first.id)
    destroy(alice.client, first.id)
    alice.client.close()
