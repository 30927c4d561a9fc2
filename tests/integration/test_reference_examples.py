"""Every request and response example of the iron.sh reference for the control-plane resources, reproduced
against the running server field for field (values the server chooses are checked for shape)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.support import Account, Server

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def is_id(value: object, prefix: str) -> bool:
    return isinstance(value, str) and re.fullmatch(rf"{prefix}_[0-9a-z]+", value) is not None


def is_timestamp(value: object) -> bool:
    return isinstance(value, str) and TIMESTAMP.fullmatch(value) is not None


def assert_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]


def assert_list(body: dict[str, Any]) -> list[dict[str, Any]]:
    assert set(body) == {"data", "has_more", "cursor"}
    assert isinstance(body["data"], list)
    assert isinstance(body["has_more"], bool)
    assert body["cursor"] is None or isinstance(body["cursor"], str)
    return body["data"]


# --- Signup ----------------------------------------------------------------------------------------------


def test_create_user_example(server: Server) -> None:
    email = f"alice-{datetime.now(UTC).timestamp()}@example.com"
    with server.client() as anon:
        resp = anon.post(
            "/v1/users",
            json={"first_name": "Alice", "last_name": "Smith", "email": email, "password": "s3cureP@ssword"},
        )
    assert resp.status_code == 201
    body = resp.json()
    assert set(body) == {"api_key", "user"}
    key, user = body["api_key"], body["user"]
    assert set(key) == {"id", "name", "token", "created_at"}
    assert is_id(key["id"], "key")
    assert key["name"] == "CLI"
    assert is_timestamp(key["created_at"])
    assert key["token"].startswith("corral_live_")
    assert set(user) == {"id", "first_name", "last_name", "email", "email_verified", "created_at"}
    assert is_id(user["id"], "usr")
    assert (user["first_name"], user["last_name"], user["email"]) == ("Alice", "Smith", email)
    assert user["email_verified"] is False
    assert is_timestamp(user["created_at"])
    # "The returned token can be used immediately as a Bearer token"
    with server.client(key["token"]) as authed:
        me = authed.get("/v1/users/me")
    assert me.status_code == 200
    assert me.json()["id"] == user["id"]


def test_create_user_errors(server: Server, account: Account) -> None:
    with server.client() as anon:
        again = {
            "first_name": "A",
            "last_name": "B",
            "email": account.email.upper(),
            "password": "another-pass",
        }
        assert_error(anon.post("/v1/users", json=again), 409, "email_taken")
        bad = {"first_name": "A", "last_name": "B", "email": "not-an-email", "password": "s3cureP@ssword"}
        assert_error(anon.post("/v1/users", json=bad), 422, "validation_error")
        short = {"first_name": "A", "last_name": "B", "email": "x@example.com", "password": "short"}
        assert_error(anon.post("/v1/users", json=short), 422, "validation_error")


def test_unauthenticated_requests_are_refused(server: Server) -> None:
    with server.client() as anon:
        for path in ("/v1/env", "/v1/secrets", "/v1/egress/policy", "/v1/egress/rules", "/v1/audit/egress"):
            assert_error(anon.get(path), 401, "unauthorized")
    with server.client("corral_live_not-a-real-key-000000000000") as bogus:
        assert_error(bogus.get("/v1/env"), 401, "unauthorized")


# --- Environment variables --------------------------------------------------------------------------------


def test_env_examples(account: Account) -> None:
    c = account.client
    put = c.put("/v1/env/NODE_ENV", json={"value": "production"})
    assert put.status_code == 200
    var = put.json()
    assert set(var) == {"id", "key", "value", "created_at", "updated_at"}
    assert is_id(var["id"], "env")
    assert var["key"] == "NODE_ENV"
    assert var["value"] == "production"
    assert is_timestamp(var["created_at"])
    assert is_timestamp(var["updated_at"])

    got = c.get("/v1/env/NODE_ENV")
    assert got.status_code == 200
    assert got.json() == var

    listed = c.get("/v1/env")
    assert listed.status_code == 200
    assert assert_list(listed.json()) == [var]
    assert listed.json()["has_more"] is False
    assert listed.json()["cursor"] is None

    # PUT again replaces the value and keeps the ID
    replaced = c.put("/v1/env/NODE_ENV", json={"value": "staging"}).json()
    assert replaced["id"] == var["id"]
    assert replaced["value"] == "staging"
    assert replaced["created_at"] == var["created_at"]

    assert_error(c.put("/v1/env/1BAD", json={"value": "x"}), 422, "validation_error")
    assert_error(c.put("/v1/env/GOOD", json={}), 422, "validation_error")

    deleted = c.delete("/v1/env/NODE_ENV")
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert_error(c.get("/v1/env/NODE_ENV"), 404, "env_not_found")
    assert_error(c.delete("/v1/env/NODE_ENV"), 404, "env_not_found")


# --- Secrets ----------------------------------------------------------------------------------------------

SECRET_FIELDS = {"id", "name", "env_var", "hosts", "proxy_value", "comment", "created_at", "updated_at"}


def test_secret_examples(account: Account) -> None:
    c = account.client
    value = "ghp_abc123def456-reference-example"
    resp = c.post("/v1/secrets", json={"name": "github-main", "secret": value, "env_var": "GITHUB_TOKEN"})
    assert resp.status_code == 201
    sec = resp.json()
    assert set(sec) == SECRET_FIELDS
    assert is_id(sec["id"], "sec")
    assert sec["name"] == "github-main"
    assert sec["env_var"] == "GITHUB_TOKEN"
    assert sec["hosts"] == ["*"]
    assert sec["comment"] is None
    assert sec["proxy_value"] == "CORRAL_PROXY_github-main"
    assert is_timestamp(sec["created_at"])
    assert sec["created_at"] == sec["updated_at"]
    assert value not in resp.text

    # Get: same shape as the create response
    got = c.get(f"/v1/secrets/{sec['id']}")
    assert got.status_code == 200
    assert got.json() == sec

    listed = c.get("/v1/secrets")
    assert assert_list(listed.json()) == [sec]
    assert value not in listed.text

    # Duplicate name, duplicate env_var
    dup = c.post("/v1/secrets", json={"name": "github-main", "secret": "x", "env_var": "OTHER"})
    assert_error(dup, 409, "secret_name_taken")
    dup_env = c.post("/v1/secrets", json={"name": "other", "secret": "x", "env_var": "GITHUB_TOKEN"})
    assert_error(dup_env, 409, "env_var_taken")

    # Host scoping example
    scoped = c.post(
        "/v1/secrets",
        json={
            "name": "github-scoped",
            "secret": "ghp_scoped",
            "env_var": "GITHUB_SCOPED",
            "hosts": ["api.github.com", "*.github.com"],
        },
    )
    assert scoped.status_code == 201
    assert scoped.json()["hosts"] == ["api.github.com", "*.github.com"]
    for bad_hosts in (["a..b"], ["*.*.github.com"], ["foo*.github.com"], ["10.0.0.1"], []):
        body = {"name": "bad-hosts", "secret": "x", "env_var": "BAD_HOSTS", "hosts": bad_hosts}
        assert_error(c.post("/v1/secrets", json=body), 422, "validation_error")

    # Update: only given fields change; value never returned
    new_value = "ghp_newtoken789-reference-example"
    patched = c.patch(f"/v1/secrets/{sec['id']}", json={"secret": new_value})
    assert patched.status_code == 200
    body = patched.json()
    assert set(body) == SECRET_FIELDS
    assert new_value not in patched.text
    assert {k: v for k, v in body.items() if k != "updated_at"} == {
        k: v for k, v in sec.items() if k != "updated_at"
    }
    patched = c.patch(f"/v1/secrets/{sec['id']}", json={"hosts": ["api.github.com"], "comment": "CI token"})
    assert patched.json()["hosts"] == ["api.github.com"]
    assert patched.json()["comment"] == "CI token"
    assert_error(c.patch(f"/v1/secrets/{sec['id']}", json={"name": "renamed"}), 422, "validation_error")
    assert_error(c.patch(f"/v1/secrets/{sec['id']}", json={"env_var": "GITHUB_SCOPED"}), 409, "env_var_taken")
    assert c.get(f"/v1/secrets/{sec['id']}").json()["name"] == "github-main"

    deleted = c.delete(f"/v1/secrets/{sec['id']}")
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert_error(c.get(f"/v1/secrets/{sec['id']}"), 404, "secret_not_found")


# --- Egress policy and rules ------------------------------------------------------------------------------


def test_egress_policy_examples(account: Account) -> None:
    c = account.client
    assert c.get("/v1/egress/policy").json() == {"mode": "enforce"}
    put = c.put("/v1/egress/policy", json={"mode": "warn"})
    assert put.status_code == 200
    assert put.json() == {"mode": "warn"}
    assert c.get("/v1/egress/policy").json() == {"mode": "warn"}
    put = c.put("/v1/egress/policy", json={"mode": "enforce"})
    assert put.json() == {"mode": "enforce"}
    assert_error(c.put("/v1/egress/policy", json={"mode": "block"}), 422, "validation_error")
    assert_error(c.put("/v1/egress/policy", json={}), 422, "validation_error")


RULE_FIELDS = {"id", "name", "host", "cidr", "comment", "created_at"}


def test_egress_rule_examples(account: Account) -> None:
    c = account.client
    resp = c.post(
        "/v1/egress/rules",
        json={"name": "github-api", "host": "api.github.com", "comment": "GitHub API access for code pulls"},
    )
    assert resp.status_code == 201
    github = resp.json()
    assert set(github) == RULE_FIELDS
    assert is_id(github["id"], "egr")
    assert is_timestamp(github["created_at"])
    assert github["name"] == "github-api"
    assert github["host"] == "api.github.com"
    assert github["cidr"] is None
    assert github["comment"] == "GitHub API access for code pulls"

    internal = c.post(
        "/v1/egress/rules",
        json={"name": "internal-network", "cidr": "10.0.0.0/8", "comment": "Internal network access"},
    ).json()
    assert internal["host"] is None
    assert internal["cidr"] == "10.0.0.0/8"

    listed = c.get("/v1/egress/rules").json()
    assert assert_list(listed) == [internal, github]  # created_at desc by default
    assert c.get("/v1/egress/rules", params={"order": "asc"}).json()["data"] == [github, internal]
    assert c.get("/v1/egress/rules", params={"host": "api.github.com"}).json()["data"] == [github]
    assert c.get("/v1/egress/rules", params={"cidr": "10.0.0.0/8"}).json()["data"] == [internal]
    assert c.get("/v1/egress/rules", params={"name": "internal-network"}).json()["data"] == [internal]
    by_host = c.get("/v1/egress/rules", params={"sort": "host", "order": "desc"}).json()["data"]
    assert by_host == [github, internal]

    wildcard = c.post("/v1/egress/rules", json={"host": "*.example.org"})
    assert wildcard.status_code == 201
    assert wildcard.json()["name"] is None

    assert_error(
        c.post("/v1/egress/rules", json={"name": "github-api", "host": "x.example.com"}),
        409,
        "rule_name_taken",
    )
    both = {"host": "a.example.com", "cidr": "10.0.0.0/8"}
    for bad in (both, {}, {"host": "*"}, {"cidr": "10.0.0.1/8"}, {"cidr": "300.0.0.0/8"}, {"host": "a..b"}):
        assert_error(c.post("/v1/egress/rules", json=bad), 422, "validation_error")

    deleted = c.delete(f"/v1/egress/rules/{github['id']}")
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert_error(c.delete(f"/v1/egress/rules/{github['id']}"), 404, "egress_rule_not_found")
    assert github not in c.get("/v1/egress/rules").json()["data"]


# --- Audit ------------------------------------------------------------------------------------------------


def test_audit_example(server: Server, account: Account) -> None:
    from tests.integration.audit_rows import insert_events

    user_id = str(account.user["id"])
    t0 = datetime(2026, 2, 28, 12, 5, 30, tzinfo=UTC)
    insert_events(
        server,
        user_id,
        [
            dict(
                timestamp=t0,
                vm_id="vm_k3mf9xvw2p",
                host="api.github.com",
                cidr=None,
                protocol="tls",
                verdict="allowed",
                allowed=True,
                mode="enforce",
            ),
            dict(
                timestamp=t0.replace(second=40),
                vm_id="vm_k3mf9xvw2p",
                host="evil.example.com",
                cidr=None,
                protocol="http",
                verdict="denied",
                allowed=False,
                mode="enforce",
            ),
        ],
    )
    resp = account.client.get(
        "/v1/audit/egress", params={"vm_id": "vm_k3mf9xvw2p", "verdict": "allowed", "limit": 20}
    )
    assert resp.status_code == 200
    events = assert_list(resp.json())
    assert len(events) == 1
    ev = events[0]
    assert set(ev) == {"id", "timestamp", "vm_id", "host", "cidr", "protocol", "verdict", "allowed", "mode"}
    assert is_id(ev["id"], "ee")
    assert {k: v for k, v in ev.items() if k != "id"} == {
        "timestamp": "2026-02-28T12:05:30Z",
        "vm_id": "vm_k3mf9xvw2p",
        "host": "api.github.com",
        "cidr": None,
        "protocol": "tls",
        "verdict": "allowed",
        "allowed": True,
        "mode": "enforce",
    }
    denied = account.client.get(
        "/v1/audit/egress", params={"vm_id": "vm_k3mf9xvw2p", "verdict": "denied", "limit": 20}
    )
    assert [e["host"] for e in denied.json()["data"]] == ["evil.example.com"]


# --- Device-code login ------------------------------------------------------------------------------------


def test_device_code_examples(server: Server, account: Account) -> None:
    with server.client() as anon:
        resp = anon.post("/v1/auth/device/code")
        assert resp.status_code == 200
        body = resp.json()
        assert set(body) == {"data"}
        assert set(body["data"]) == {"code", "verification_uri", "expires_at"}
        code = body["data"]["code"]
        assert re.fullmatch(r"[A-Z]{4}-\d{4}", code)
        assert body["data"]["verification_uri"] == f"{server.url}/activate"
        assert is_timestamp(body["data"]["expires_at"])

        pending = anon.get("/v1/auth/device/poll", params={"code": code})
        assert pending.status_code == 200
        assert pending.json() == {"data": {"status": "pending"}}

        approved = account.client.post("/v1/auth/device/approve", json={"code": code.lower()})
        assert approved.status_code == 200
        assert approved.json() == {"data": {"code": code, "status": "approved"}}

        authorized = anon.get("/v1/auth/device/poll", params={"code": code})
        assert authorized.status_code == 200
        data = authorized.json()["data"]
        assert set(data) == {"status", "token"}
        assert data["status"] == "authorized"
        with server.client(data["token"]) as device:
            assert device.get("/v1/users/me").json()["id"] == account.user["id"]

        # the token is delivered once; afterwards the code is spent
        assert anon.get("/v1/auth/device/poll", params={"code": code}).json() == {
            "data": {"status": "expired"}
        }
        assert anon.get("/v1/auth/device/poll", params={"code": "ZZZZ-0000"}).json() == {
            "data": {"status": "expired"}
        }
        assert_error(anon.get("/v1/auth/device/poll"), 400, "invalid_parameter")
        assert_error(
            anon.get("/v1/auth/device/poll", params={"code": "not a code"}), 400, "invalid_parameter"
        )
        assert_error(
            account.client.post("/v1/auth/device/approve", json={"code": "ZZZZ-0000"}),
            404,
            "device_code_not_found",
        )


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_need_no_auth(server: Server, path: str) -> None:
    with server.client() as anon:
        resp = anon.get(path)
    assert resp.status_code == 200
    assert resp.json()["status"] in {"ok", "ready"}
