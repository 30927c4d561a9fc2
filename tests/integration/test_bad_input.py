"""Bad input of every kind, for every endpoint, against the real server.

Each case is one request that must fail. It asserts the exact status and error code, that the body is the
documented envelope ``{"error": {"code", "message"}}`` and nothing else, and that the request changed nothing:
every row of every table, and what the two users see through the API, is the same before and after. No
response may contain a secret's value, nor anything of another user's objects.

Conventions (from the API reference and ``corral.api.errors``): malformed JSON -> 400 invalid_json; bad query
or path parameter -> 400 invalid_parameter; bad cursor -> 400 invalid_cursor; body over 1 MiB -> 400
request_too_large; missing or invalid key -> 401 unauthorized; unknown or another user's ID -> 404
<resource>_not_found (never 403); body validation (wrong type, missing field, unknown field, null) -> 422
validation_error; uniqueness -> 409.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from corral.store.db import make_engine
from corral.store.tables import Base
from tests.integration.audit_rows import insert_events
from tests.support import Account, Server, signup

MIB = 1024 * 1024
SECRET_VALUE = "ghp_BadInputSecretValue0123456789abcdef"  # alice's secrets; must appear in no response
BOB_SECRET_VALUE = "ghp_BobsOwnSecretValue0123456789abcdef"
# Strings only bob's objects contain: no response to alice may contain any of them.
BOB_MARKERS = ("bob-secret", "BOB_ONLY_TOKEN", "bob-only.example.com", "bob env value", "bob-rule")
TS = "2026-02-28T12:00:00+00:00"
# written by any authenticated request, at most once a minute per key (GET /v1/api-keys shows it)
BOOKKEEPING = {("api_keys", "last_used_at")}
NO_BODY: Any = object()


# --- the world the cases run in -------------------------------------------------------------------------


@dataclass(repr=False)
class World:
    server: Server
    alice: Account
    bob: Account
    engine: Engine
    marks: dict[str, str]  # <name> placeholders in case paths and bodies
    # sends the cases: no default headers, a new connection each time (after a 500 the server drops it)
    sender: httpx.Client
    api_seen: dict[str, Any] = field(default_factory=dict)  # the API view after the previous case

    def __repr__(self) -> str:
        return f"World({self.server.url})"

    def fill(self, text: str) -> str:
        for name, value in self.marks.items():
            text = text.replace(f"<{name}>", value)
        # a fresh address each time, so a wrongly created account cannot turn later cases into 409s
        return text.replace("<email>", f"bad-input-{secrets.token_hex(6)}@example.com")

    def fill_json(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.fill(value)
        if isinstance(value, list):
            return [self.fill_json(v) for v in value]
        if isinstance(value, dict):
            return {self.fill(k): self.fill_json(v) for k, v in value.items()}
        return value

    def db_state(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table (but the bookkeeping any request with a key may write: its last use)."""
        with self.engine.connect() as conn:
            return {
                table.name: [
                    tuple(row)
                    for row in conn.execute(
                        select(
                            *(c for c in table.columns if (table.name, c.name) not in BOOKKEEPING)
                        ).order_by(*table.primary_key.columns)
                    )
                ]
                for table in Base.metadata.sorted_tables
            }

    def api_state(self) -> dict[str, Any]:
        """What the two users see when they list their things."""
        state: dict[str, Any] = {}
        for who, acct, paths in (
            ("alice", self.alice, ("/v1/env", "/v1/secrets", "/v1/egress/rules", "/v1/egress/policy")),
            ("bob", self.bob, ("/v1/env", "/v1/secrets", "/v1/egress/rules")),
        ):
            for path in paths:
                resp = acct.client.get(path, params={} if path == "/v1/egress/policy" else {"limit": 200})
                assert resp.status_code == 200, resp.text
                state[f"{who} GET {path}"] = resp.json()
        return state


def _api(client: httpx.Client, method: str, path: str, status: int, **kwargs: Any) -> Any:
    resp = client.request(method, path, **kwargs)
    assert resp.status_code == status, resp.text
    return resp.json()


def _cursor_of(client: httpx.Client, path: str, **params: Any) -> str:
    body = _api(client, "GET", path, 200, params={"limit": 1, **params})
    assert body["has_more"], body
    assert isinstance(body["cursor"], str), body
    cursor: str = body["cursor"]
    return cursor


@pytest.fixture(scope="module")
def world(server: Server) -> Iterator[World]:
    alice = signup(server, first_name="Alice", last_name="Bad-Input")
    bob = signup(server, first_name="Bob", last_name="Bad-Input")
    marks: dict[str, str] = {}
    a, b = alice.client, bob.client

    _api(a, "PUT", "/v1/env/SEEDED_A", 200, json={"value": "alpha"})
    marks["a_env_id"] = _api(a, "PUT", "/v1/env/SEEDED_B", 200, json={"value": "beta"})["id"]
    for name, env_var in (("alice-one", "ALICE_ONE"), ("alice-two", "ALICE_TWO")):
        body = {"name": name, "secret": SECRET_VALUE, "env_var": env_var, "hosts": ["api.github.com"]}
        marks[name] = _api(a, "POST", "/v1/secrets", 201, json=body)["id"]
    marks["a_secret"] = marks["alice-one"]
    marks["a_rule"] = _api(
        a, "POST", "/v1/egress/rules", 201, json={"name": "alice-rule", "host": "a1.example.com"}
    )["id"]
    _api(a, "POST", "/v1/egress/rules", 201, json={"cidr": "10.1.0.0/16", "comment": "second"})
    _api(a, "PUT", "/v1/env/DOOMED", 200, json={"value": "doomed"})
    doomed = {"name": "doomed", "secret": SECRET_VALUE, "env_var": "DOOMED_TOKEN"}
    marks["doomed_secret"] = _api(a, "POST", "/v1/secrets", 201, json=doomed)["id"]
    marks["doomed_rule"] = _api(a, "POST", "/v1/egress/rules", 201, json={"host": "doomed.example.com"})["id"]
    event = {"vm_id": None, "host": "api.github.com", "cidr": None, "protocol": "tls", "mode": "enforce"}
    insert_events(
        server,
        str(alice.user["id"]),
        [
            {**event, "timestamp": _dt("2026-02-28T12:00:00"), "verdict": "allowed", "allowed": True},
            {**event, "timestamp": _dt("2026-02-28T12:05:00"), "verdict": "denied", "allowed": False},
        ],
    )

    bob_secret = {"name": "bob-secret", "secret": BOB_SECRET_VALUE, "env_var": "BOB_ONLY_TOKEN"}
    marks["b_secret"] = _api(b, "POST", "/v1/secrets", 201, json=bob_secret)["id"]
    marks["b_rule"] = _api(
        b, "POST", "/v1/egress/rules", 201, json={"name": "bob-rule", "host": "bob-only.example.com"}
    )["id"]
    _api(b, "PUT", "/v1/env/BOB_ONLY", 200, json={"value": "bob env value"})

    with server.client() as anon:
        marks["pending_code"] = _api(anon, "POST", "/v1/auth/device/code", 200)["data"]["code"]
        marks["bob_code"] = _api(anon, "POST", "/v1/auth/device/code", 200)["data"]["code"]
    _api(b, "POST", "/v1/auth/device/approve", 200, json={"code": marks["bob_code"]})

    # real cursors, to replay with another sort or order
    marks["cur_secrets_name_asc"] = _cursor_of(a, "/v1/secrets", sort="name", order="asc")
    marks["cur_secrets_created_asc"] = _cursor_of(a, "/v1/secrets", order="asc")
    marks["cur_rules_host_desc"] = _cursor_of(a, "/v1/egress/rules", sort="host")
    marks["cur_rules_created_desc"] = _cursor_of(a, "/v1/egress/rules")
    marks["cur_audit_asc"] = _cursor_of(a, "/v1/audit/egress", order="asc")
    marks["cur_env"] = _cursor_of(a, "/v1/env")
    marks["alice_token"] = alice.token
    marks["alice_token_truncated"] = alice.token[:-1]

    engine = make_engine(server.database_url)
    sender = httpx.Client(base_url=server.url, timeout=60)
    try:
        w = World(server=server, alice=alice, bob=bob, engine=engine, marks=marks, sender=sender)
        w.api_seen = w.api_state()
        yield w
    finally:
        sender.close()
        engine.dispose()
        alice.client.close()
        bob.client.close()


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- cases ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    status: int
    code: str
    body: Any = NO_BODY  # sent as JSON
    raw: bytes | None = None  # sent as is
    chunked: bool = False  # raw sent as a stream, without Content-Length
    pad_to: int | None = None  # raw padded with trailing spaces to exactly this many bytes
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    auth: str | None = "alice"  # whose key; None: no Authorization header unless ``headers`` has one

    def __repr__(self) -> str:
        return f"Case({self.id}: {self.method} {self.path} -> {self.status} {self.code})"

    def send(self, world: World) -> httpx.Response:
        headers = {k: world.fill(v) for k, v in self.headers.items()}
        if self.auth is not None:
            acct = world.alice if self.auth == "alice" else world.bob
            headers.setdefault("Authorization", f"Bearer {acct.token}")
        content: bytes | Iterator[bytes] | None = None
        if self.body is not NO_BODY:
            content = json.dumps(world.fill_json(self.body)).encode()
            headers.setdefault("Content-Type", "application/json")
        elif self.raw is not None:
            content = world.fill(self.raw.decode("latin-1")).encode("latin-1")
            if self.pad_to is not None:
                content += b" " * (self.pad_to - len(content))
        if self.chunked:
            assert isinstance(content, bytes)
            content = _chunks(content)
        params = {k: world.fill(v) for k, v in self.params.items()}
        headers["Connection"] = "close"
        return world.sender.request(
            self.method, world.fill(self.path), params=params, headers=headers, content=content
        )


def _chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def cursor(payload: object) -> str:
    return b64(json.dumps(payload).encode())


# --- body endpoints: wrong types, missing, unknown, null, bad JSON, size, content type ------------------


@dataclass(frozen=True)
class BodyEndpoint:
    name: str
    method: str
    path: str
    valid: dict[str, Any]  # a body that would succeed (and change something)
    kinds: dict[str, str]  # field -> "str" | "str_list" | "enum"
    required: frozenset[str]
    nullable: frozenset[str]  # null is a valid value for these
    auth: bool = True


BODY_ENDPOINTS = (
    BodyEndpoint(
        "users.create",
        "POST",
        "/v1/users",
        {"first_name": "Eve", "last_name": "Doe", "email": "<email>", "password": "s3cureP@ssword"},
        {"first_name": "str", "last_name": "str", "email": "str", "password": "str"},
        frozenset({"first_name", "last_name", "email", "password"}),
        frozenset(),
        auth=False,
    ),
    BodyEndpoint(
        "auth.approve",
        "POST",
        "/v1/auth/device/approve",
        {"code": "<pending_code>"},
        {"code": "str"},
        frozenset({"code"}),
        frozenset(),
    ),
    BodyEndpoint(
        "env.put",
        "PUT",
        "/v1/env/BAD_INPUT_NEW",
        {"value": "x"},
        {"value": "str"},
        frozenset({"value"}),
        frozenset(),
    ),
    BodyEndpoint(
        "secrets.create",
        "POST",
        "/v1/secrets",
        {
            "name": "fresh-secret",
            "secret": SECRET_VALUE,
            "env_var": "FRESH_TOKEN",
            "hosts": ["api.github.com"],
            "comment": "c",
        },
        {"name": "str", "secret": "str", "env_var": "str", "hosts": "str_list", "comment": "str"},
        frozenset({"name", "secret", "env_var"}),
        frozenset({"hosts", "comment"}),
    ),
    BodyEndpoint(
        "secrets.update",
        "PATCH",
        "/v1/secrets/<a_secret>",
        {"secret": SECRET_VALUE + "-new", "env_var": "ALICE_NEW", "hosts": ["example.org"], "comment": "new"},
        {"secret": "str", "env_var": "str", "hosts": "str_list", "comment": "str"},
        frozenset(),
        frozenset({"comment"}),
    ),
    BodyEndpoint(
        "egress.policy.put",
        "PUT",
        "/v1/egress/policy",
        {"mode": "warn"},
        {"mode": "enum"},
        frozenset({"mode"}),
        frozenset(),
    ),
    BodyEndpoint(
        "egress.rules.create",
        "POST",
        "/v1/egress/rules",
        {"name": "fresh-rule", "host": "fresh.example.com", "comment": "c"},
        {"name": "str", "host": "str", "cidr": "str", "comment": "str"},
        frozenset(),
        frozenset({"name", "cidr", "comment"}),  # host null with no cidr is "neither": invalid
    ),
)


def _wrong_types(kind: str, valid: Any) -> list[tuple[str, Any]]:
    common: list[tuple[str, Any]] = [("int", 1), ("float", 1.5), ("bool", True), ("object", {"value": valid})]
    if kind == "str_list":
        return [
            *common,
            ("string", "api.github.com"),
            ("list-of-int", [1]),
            ("list-of-null", [None]),
            ("list-of-list", [["api.github.com"]]),
        ]
    # a string field: the valid value, wrapped (for ``secret``: the secret value must not be echoed)
    return [*common, ("list", [valid if valid is not None else "x"])]


def body_cases(ep: BodyEndpoint) -> list[Case]:
    auth = "alice" if ep.auth else None

    def case(suffix: str, status: int, code: str, **kwargs: Any) -> Case:
        return Case(f"{ep.name}/{suffix}", ep.method, ep.path, status, code, auth=auth, **kwargs)

    out: list[Case] = []
    for name, kind in ep.kinds.items():
        valid = ep.valid.get(name, "x")
        for label, value in _wrong_types(kind, valid):
            out.append(
                case(f"{name}-wrong-type-{label}", 422, "validation_error", body={**ep.valid, name: value})
            )
        if name not in ep.nullable:
            out.append(case(f"{name}-null", 422, "validation_error", body={**ep.valid, name: None}))
        if kind == "enum":
            for label, value in (("unknown", "block"), ("upper-case", "WARN"), ("empty", "")):
                out.append(case(f"{name}-{label}", 422, "validation_error", body={**ep.valid, name: value}))
    for name in sorted(ep.required):
        body = {k: v for k, v in ep.valid.items() if k != name}
        out.append(case(f"missing-{name}", 422, "validation_error", body=body))
    for label, extra in (
        ("unknown", {"unexpected": 1}),
        ("id", {"id": "x_1"}),
        ("created_at", {"created_at": TS}),
    ):
        out.append(case(f"unknown-field-{label}", 422, "validation_error", body={**ep.valid, **extra}))

    text = json.dumps(ep.valid).encode()
    js = {"Content-Type": "application/json"}
    for label, raw in (
        ("truncated", text[:-1]),
        ("trailing-comma", text[:-1] + b",}"),
        ("single-quotes", text.replace(b'"', b"'")),
        ("bare-word", b"hello"),
        ("not-utf8", b"\xff\xfe\xfd"),
        ("two-documents", text + text),
        ("deeply-nested", b"[" * 100_000 + b"]" * 100_000),
    ):
        out.append(case(f"bad-json-{label}", 400, "invalid_json", raw=raw, headers=js))
    for label, raw in (
        ("array", b"[]"),
        ("array-of-body", b"[" + text + b"]"),
        ("string", b'"x"'),
        ("number", b"1"),
        ("true", b"true"),
        ("null", b"null"),
        ("empty", b""),
    ):
        out.append(case(f"non-object-{label}", 422, "validation_error", raw=raw, headers=js))
    for label, ctype, raw in (
        ("text-plain", "text/plain", text),
        ("form", "application/x-www-form-urlencoded", b"value=x"),
        ("xml", "application/xml", b"<value>x</value>"),
    ):
        out.append(
            case(f"content-type-{label}", 422, "validation_error", raw=raw, headers={"Content-Type": ctype})
        )
    out.append(case("content-type-missing", 422, "validation_error", raw=text))

    huge = text + b" " * MIB  # valid JSON, over the limit only because of whitespace
    out.append(case("huge-content-length", 400, "request_too_large", raw=huge, headers=js))
    out.append(case("huge-chunked", 400, "request_too_large", raw=huge, headers=js, chunked=True))
    out.append(case("huge-garbage", 400, "request_too_large", raw=b"\xff" * (MIB + 1), headers=js))
    # exactly at the limit is not too large: it gets as far as validation (the unknown field)
    at_limit = json.dumps({**ep.valid, "unexpected": 1}).encode()
    out.append(case("exactly-1mib", 422, "validation_error", raw=at_limit, pad_to=MIB, headers=js))
    return out


# Values the server rejects beyond their JSON type: shape, length, uniqueness.
SEMANTIC_CASES = [
    Case("users.create/email-invalid", "POST", "/v1/users", 422, "validation_error", auth=None,
         body={"first_name": "E", "last_name": "D", "email": "not-an-email", "password": "s3cureP@ssword"}),
    Case("users.create/password-short", "POST", "/v1/users", 422, "validation_error", auth=None,
         body={"first_name": "E", "last_name": "D", "email": "<email>", "password": "short"}),
    Case("users.create/first-name-empty", "POST", "/v1/users", 422, "validation_error", auth=None,
         body={"first_name": "", "last_name": "D", "email": "<email>", "password": "s3cureP@ssword"}),
    Case("users.create/first-name-blank", "POST", "/v1/users", 422, "validation_error", auth=None,
         body={"first_name": "   ", "last_name": "D", "email": "<email>", "password": "s3cureP@ssword"}),
    Case("users.create/last-name-too-long", "POST", "/v1/users", 422, "validation_error", auth=None,
         body={"first_name": "E", "last_name": "x" * 101, "email": "<email>", "password": "s3cureP@ssword"}),
    Case("users.create/lone-surrogate", "POST", "/v1/users", 422, "validation_error", auth=None,
         raw=b'{"first_name": "\\ud800", "last_name": "D", "email": "<email>", "password": "s3cureP@ssword"}',
         headers={"Content-Type": "application/json"}),
    Case("auth.approve/code-malformed", "POST", "/v1/auth/device/approve", 422, "validation_error",
         body={"code": "garbage"}),
    Case("auth.approve/code-empty", "POST", "/v1/auth/device/approve", 422, "validation_error", body={"code": ""}),
    Case("auth.approve/code-too-long", "POST", "/v1/auth/device/approve", 422, "validation_error",
         body={"code": "A" * 33}),
    Case("auth.approve/code-unknown", "POST", "/v1/auth/device/approve", 404, "device_code_not_found",
         body={"code": "ZZZZ-0000"}),
    # a code another user already approved: a conflict, and it stays theirs
    Case("auth.approve/code-of-other-user", "POST", "/v1/auth/device/approve", 409, "device_code_used",
         body={"code": "<bob_code>"}),
    Case("env.put/value-nul", "PUT", "/v1/env/BAD_INPUT_NEW", 422, "validation_error", body={"value": "a\x00b"}),
    Case("env.put/value-too-long", "PUT", "/v1/env/BAD_INPUT_NEW", 422, "validation_error",
         body={"value": "x" * (32 * 1024 + 1)}),
    Case("env.put/key-leading-digit", "PUT", "/v1/env/1BAD", 422, "validation_error", body={"value": "x"}),
    Case("env.put/key-dash", "PUT", "/v1/env/BAD-KEY", 422, "validation_error", body={"value": "x"}),
    Case("env.put/key-257", "PUT", "/v1/env/" + "K" * 257, 422, "validation_error", body={"value": "x"}),
    Case("env.put/key-513", "PUT", "/v1/env/" + "K" * 513, 422, "validation_error", body={"value": "x"}),
    Case("secrets.create/name-invalid", "POST", "/v1/secrets", 422, "validation_error",
         body={"name": "bad name!", "secret": SECRET_VALUE, "env_var": "FRESH_TOKEN"}),
    Case("secrets.create/name-too-long", "POST", "/v1/secrets", 422, "validation_error",
         body={"name": "n" * 65, "secret": SECRET_VALUE, "env_var": "FRESH_TOKEN"}),
    Case("secrets.create/env-var-lower-case", "POST", "/v1/secrets", 422, "validation_error",
         body={"name": "fresh", "secret": SECRET_VALUE, "env_var": "fresh_token"}),
    Case("secrets.create/env-var-leading-digit", "POST", "/v1/secrets", 422, "validation_error",
         body={"name": "fresh", "secret": SECRET_VALUE, "env_var": "1TOKEN"}),
    Case("secrets.create/hosts-empty", "POST", "/v1/secrets", 422, "validation_error",
         body={"name": "fresh", "secret": SECRET_VALUE, "env_var": "FRESH_TOKEN", "hosts": []}),
    Case("secrets.create/hosts-invalid", "POST", "/v1/secrets", 422, "validation_error",
         body={"name": "fresh", "secret": SECRET_VALUE, "env_var": "FRESH_TOKEN", "hosts": ["bad host!"]}),
    Case("secrets.create/hosts-double-wildcard", "POST", "/v1/secrets", 422, "validation_error",
         body={"name": "fresh", "secret": SECRET_VALUE, "env_var": "FRESH_TOKEN", "hosts": ["*.*.example.com"]}),
    Case("secrets.create/hosts-too-many", "POST", "/v1/secrets", 422, "validation_error",
         body={"name": "fresh", "secret": SECRET_VALUE, "env_var": "FRESH_TOKEN",
               "hosts": [f"h{n}.example.com" for n in range(101)]}),
    Case("secrets.create/secret-empty", "POST", "/v1/secrets", 422, "validation_error",
         body={"name": "fresh", "secret": "", "env_var": "FRESH_TOKEN"}),
    Case("secrets.create/secret-too-long", "POST", "/v1/secrets", 422, "validation_error",
         body={"name": "fresh", "secret": SECRET_VALUE * 2000, "env_var": "FRESH_TOKEN"}),
    Case("secrets.create/secret-lone-surrogate", "POST", "/v1/secrets", 422, "validation_error",
         raw=b'{"name": "fresh", "secret": "' + SECRET_VALUE.encode() + b'\\ud800", "env_var": "FRESH_TOKEN"}',
         headers={"Content-Type": "application/json"}),
    Case("secrets.create/comment-too-long", "POST", "/v1/secrets", 422, "validation_error",
         body={"name": "fresh", "secret": SECRET_VALUE, "env_var": "FRESH_TOKEN", "comment": "c" * 1025}),
    Case("secrets.create/name-taken", "POST", "/v1/secrets", 409, "secret_name_taken",
         body={"name": "alice-one", "secret": SECRET_VALUE, "env_var": "FRESH_TOKEN"}),
    Case("secrets.create/env-var-taken", "POST", "/v1/secrets", 409, "env_var_taken",
         body={"name": "fresh", "secret": SECRET_VALUE, "env_var": "ALICE_ONE"}),
    Case("secrets.update/name", "PATCH", "/v1/secrets/<a_secret>", 422, "validation_error",
         body={"name": "renamed"}),
    # a valid change alongside an invalid one: neither is applied
    Case("secrets.update/valid-env-var-invalid-hosts", "PATCH", "/v1/secrets/<a_secret>", 422, "validation_error",
         body={"env_var": "ALICE_NEW", "hosts": ["bad host!"]}),
    Case("secrets.update/valid-comment-empty-secret", "PATCH", "/v1/secrets/<a_secret>", 422, "validation_error",
         body={"comment": "changed", "secret": ""}),
    Case("secrets.update/env-var-invalid", "PATCH", "/v1/secrets/<a_secret>", 422, "validation_error",
         body={"env_var": "lower"}),
    Case("secrets.update/hosts-empty", "PATCH", "/v1/secrets/<a_secret>", 422, "validation_error",
         body={"hosts": []}),
    Case("secrets.update/env-var-taken", "PATCH", "/v1/secrets/<a_secret>", 409, "env_var_taken",
         body={"comment": "changed", "env_var": "ALICE_TWO"}),
    Case("egress.rules.create/neither-host-nor-cidr", "POST", "/v1/egress/rules", 422, "validation_error",
         body={}),
    Case("egress.rules.create/only-comment", "POST", "/v1/egress/rules", 422, "validation_error",
         body={"comment": "no target"}),
    Case("egress.rules.create/both-host-and-cidr", "POST", "/v1/egress/rules", 422, "validation_error",
         body={"host": "a.example.com", "cidr": "10.0.0.0/8"}),
    Case("egress.rules.create/host-any", "POST", "/v1/egress/rules", 422, "validation_error", body={"host": "*"}),
    Case("egress.rules.create/host-invalid", "POST", "/v1/egress/rules", 422, "validation_error",
         body={"host": "bad host!"}),
    Case("egress.rules.create/host-ip-literal", "POST", "/v1/egress/rules", 422, "validation_error",
         body={"host": "10.0.0.1"}),
    Case("egress.rules.create/cidr-host-bits", "POST", "/v1/egress/rules", 422, "validation_error",
         body={"cidr": "10.0.0.1/8"}),
    Case("egress.rules.create/cidr-garbage", "POST", "/v1/egress/rules", 422, "validation_error",
         body={"cidr": "nope"}),
    Case("egress.rules.create/name-invalid", "POST", "/v1/egress/rules", 422, "validation_error",
         body={"name": "   ", "host": "fresh.example.com"}),
    Case("egress.rules.create/comment-too-long", "POST", "/v1/egress/rules", 422, "validation_error",
         body={"host": "fresh.example.com", "comment": "c" * 1025}),
    Case("egress.rules.create/name-taken", "POST", "/v1/egress/rules", 409, "rule_name_taken",
         body={"name": "alice-rule", "host": "fresh.example.com"}),
    # NUL in free text: refused like NUL in an env value (PostgreSQL cannot store it at all)
    Case("users.create/first-name-nul", "POST", "/v1/users", 422, "validation_error", auth=None,
         body={"first_name": "E\x00", "last_name": "D", "email": "<email>", "password": "s3cureP@ssword"}),
    Case("users.create/email-nul", "POST", "/v1/users", 422, "validation_error", auth=None,
         body={"first_name": "E", "last_name": "D", "email": "nul\x00<email>", "password": "s3cureP@ssword"}),
    Case("secrets.create/comment-nul", "POST", "/v1/secrets", 422, "validation_error",
         body={"name": "fresh", "secret": SECRET_VALUE, "env_var": "FRESH_TOKEN", "comment": "c\x00"}),
    Case("secrets.update/comment-nul", "PATCH", "/v1/secrets/<a_secret>", 422, "validation_error",
         body={"comment": "c\x00"}),
    Case("egress.rules.create/comment-nul", "POST", "/v1/egress/rules", 422, "validation_error",
         body={"host": "fresh.example.com", "comment": "c\x00"}),
]  # fmt: skip


# --- endpoints without a body: a huge one is still refused, and nothing runs ----------------------------

NO_BODY_ENDPOINTS = [
    ("auth.code", "POST", "/v1/auth/device/code", None),
    # objects of their own: if the server wrongly runs the DELETE, no other case loses its object
    ("env.delete", "DELETE", "/v1/env/DOOMED", "alice"),
    ("secrets.delete", "DELETE", "/v1/secrets/<doomed_secret>", "alice"),
    ("egress.rules.delete", "DELETE", "/v1/egress/rules/<doomed_rule>", "alice"),
    ("env.list", "GET", "/v1/env", "alice"),
]


def no_body_size_cases() -> list[Case]:
    out: list[Case] = []
    huge = b'{"pad": "' + b"x" * MIB + b'"}'
    js = {"Content-Type": "application/json"}
    for name, method, path, auth in NO_BODY_ENDPOINTS:
        out.append(Case(f"{name}/huge-content-length", method, path, 400, "request_too_large", raw=huge,
                        headers=js, auth=auth))  # fmt: skip
        out.append(Case(f"{name}/huge-chunked", method, path, 400, "request_too_large", raw=huge, headers=js,
                        chunked=True, auth=auth))  # fmt: skip
    return out


# --- IDs: unknown, wrong prefix, another user's, too long -------------------------------------------------


def id_cases() -> list[Case]:
    out: list[Case] = []
    patch = {"comment": "changed"}
    secret_ids = {
        "unknown": ("sec_000000000000", 404),
        "wrong-prefix-rule-id": ("<a_rule>", 404),
        "wrong-prefix-env-id": ("<a_env_id>", 404),
        "no-prefix": ("m4xk9wp2", 404),
        "upper-case-prefix": ("SEC_000000000000", 404),
        "bad-characters": ("sec_!!!", 404),
        "other-users": ("<b_secret>", 404),
        "too-long": ("sec_" + "0" * 61, 400),
    }
    for label, (ident, status) in secret_ids.items():
        code = "secret_not_found" if status == 404 else "invalid_parameter"
        for method in ("GET", "PATCH", "DELETE"):
            body = patch if method == "PATCH" else NO_BODY
            out.append(Case(f"secrets.{method.lower()}/id-{label}", method, f"/v1/secrets/{ident}", status, code,
                            body=body))  # fmt: skip
    rule_ids = {
        "unknown": ("egr_000000000000", 404),
        "wrong-prefix-secret-id": ("<a_secret>", 404),
        "no-prefix": ("9xm2kfp4", 404),
        "other-users": ("<b_rule>", 404),
        "too-long": ("egr_" + "0" * 61, 400),
    }
    for label, (ident, status) in rule_ids.items():
        code = "egress_rule_not_found" if status == 404 else "invalid_parameter"
        for method in ("GET", "DELETE"):
            out.append(Case(f"egress.rules.{method.lower()}/id-{label}", method, f"/v1/egress/rules/{ident}",
                            status, code))  # fmt: skip
    env_keys = {
        "unknown": ("NOT_SET_ANYWHERE", 404),
        "env-id-instead-of-key": ("<a_env_id>", 404),
        "wrong-case": ("seeded_a", 404),
        "other-users": ("BOB_ONLY", 404),
        "too-long": ("K" * 513, 404),  # no such variable (PUT of such a key is a 422)
    }
    for label, (key, status) in env_keys.items():
        code = "env_not_found" if status == 404 else "invalid_parameter"
        for method in ("GET", "DELETE"):
            out.append(Case(f"env.{method.lower()}/key-{label}", method, f"/v1/env/{key}", status, code))
    return out


# --- list parameters: limit, sort, order, cursor, filters -------------------------------------------------

LISTS = {
    # path: (max limit, sort fields or None when the endpoint has no sort, default sort key, has order)
    "/v1/env": (200, None, "created_at", False),
    "/v1/secrets": (200, ("created_at", "name"), "created_at", True),
    "/v1/egress/rules": (200, ("created_at", "host"), "created_at", True),
    "/v1/audit/egress": (500, None, "timestamp", True),
}


def _tampered(sort: str, order: str) -> dict[str, str]:
    good_key = ["t", TS]
    return {
        "garbage": "!!!not-a-cursor!!!",
        "empty": "",
        "base64-of-garbage": b64(b"\x00\xff\xfe\x9cgarbage"),
        "base64-of-text": b64(b"hello world"),
        "base64-of-object": cursor({"sort": sort, "order": order}),
        "too-long": "A" * 2049,
        "deeply-nested": b64(b"[" * 5000 + b"]" * 5000),
        "wrong-version": cursor([2, sort, order, good_key, "x_1"]),
        "version-bool": cursor([True, sort, order, good_key, "x_1"]),
        "version-float": cursor([1.0, sort, order, good_key, "x_1"]),
        "missing-id": cursor([1, sort, order, good_key]),
        "extra-element": cursor([1, sort, order, good_key, "x_1", "extra"]),
        "id-not-string": cursor([1, sort, order, good_key, 5]),
        "key-not-a-pair": cursor([1, sort, order, TS, "x_1"]),
        "key-string-for-time": cursor([1, sort, order, ["s", TS], "x_1"]),
        "key-int-for-time": cursor([1, sort, order, ["i", 5], "x_1"]),
        "key-bool": cursor([1, sort, order, ["i", True], "x_1"]),
        "key-unknown-tag": cursor([1, sort, order, ["x", TS], "x_1"]),
        "key-not-a-date": cursor([1, sort, order, ["t", "yesterday"], "x_1"]),
        "key-naive-time": cursor([1, sort, order, ["t", "2026-02-28T12:00:00"], "x_1"]),
        "key-time-underflows-in-utc": cursor([1, sort, order, ["t", "0001-01-01T00:00:00+14:00"], "x_1"]),
        "key-time-overflows-in-utc": cursor([1, sort, order, ["t", "9999-12-31T23:59:59-14:00"], "x_1"]),
        "other-sort": cursor([1, "id" if sort != "id" else "name", order, good_key, "x_1"]),
        "other-order": cursor([1, sort, "asc" if order == "desc" else "desc", good_key, "x_1"]),
    }


def list_cases() -> list[Case]:
    out: list[Case] = []
    for path, (max_limit, sorts, default_sort, has_order) in LISTS.items():
        name = path.removeprefix("/v1/").replace("/", ".") + ".list"
        for label, value in (
            ("zero", "0"),
            ("negative", "-1"),
            ("max-plus-one", str(max_limit + 1)),
            ("huge", "9" * 30),
            ("word", "ten"),
            ("fraction", "1.5"),
            ("empty", ""),
        ):
            out.append(
                Case(f"{name}/limit-{label}", "GET", path, 400, "invalid_parameter", params={"limit": value})
            )
        if sorts:
            for value in ("nope", sorts[-1].upper(), "id"):
                out.append(
                    Case(
                        f"{name}/sort-{value}", "GET", path, 400, "invalid_parameter", params={"sort": value}
                    )
                )
        if has_order:
            for value in ("sideways", "ASC", ""):
                out.append(Case(f"{name}/order-{value or 'empty'}", "GET", path, 400, "invalid_parameter",
                                params={"order": value}))  # fmt: skip
        for label, value in _tampered(default_sort, "desc").items():
            # (a cursor's own sort and order apply when the request leaves them out: "other-order" conflicts
            # only with an explicit order)
            params = {"cursor": value, **({"order": "desc"} if label == "other-order" else {})}
            out.append(Case(f"{name}/cursor-{label}", "GET", path, 400, "invalid_cursor", params=params))
    # a key of the wrong type for a string sort
    for label, key in (("time", ["t", TS]), ("int", ["i", 1])):
        value = cursor([1, "name", "asc", key, "sec_000000000000"])
        out.append(Case(f"secrets.list/cursor-name-sort-{label}-key", "GET", "/v1/secrets", 400, "invalid_cursor",
                        params={"sort": "name", "order": "asc", "cursor": value}))  # fmt: skip
    # a real cursor replayed with another sort or order
    replays = [
        ("secrets.list/cursor-from-name-sort", "/v1/secrets", {"sort": "created_at"}, "cur_secrets_name_asc"),
        ("secrets.list/cursor-from-name-sort-other-order", "/v1/secrets", {"sort": "name", "order": "desc"},
         "cur_secrets_name_asc"),
        ("secrets.list/cursor-from-asc", "/v1/secrets", {"order": "desc"}, "cur_secrets_created_asc"),
        ("secrets.list/cursor-from-created-to-name", "/v1/secrets", {"sort": "name", "order": "asc"},
         "cur_secrets_created_asc"),
        ("egress.rules.list/cursor-from-host-sort", "/v1/egress/rules", {"sort": "created_at"}, "cur_rules_host_desc"),
        ("egress.rules.list/cursor-from-created-to-host", "/v1/egress/rules", {"sort": "host"},
         "cur_rules_created_desc"),
        ("egress.rules.list/cursor-from-desc-to-asc", "/v1/egress/rules", {"order": "asc"}, "cur_rules_created_desc"),
        ("audit.egress.list/cursor-from-asc", "/v1/audit/egress", {"order": "desc"}, "cur_audit_asc"),
        ("secrets.list/cursor-from-env", "/v1/secrets", {"sort": "name"}, "cur_env"),
    ]  # fmt: skip
    for case_id, path, params, mark in replays:
        out.append(
            Case(case_id, "GET", path, 400, "invalid_cursor", params={**params, "cursor": f"<{mark}>"})
        )
    filters = [
        ("secrets.list/name-too-long", "/v1/secrets", {"name": "n" * 65}),
        ("egress.rules.list/host-too-long", "/v1/egress/rules", {"host": "h" * 256}),
        ("egress.rules.list/name-too-long", "/v1/egress/rules", {"name": "n" * 101}),
        ("egress.rules.list/cidr-too-long", "/v1/egress/rules", {"cidr": "1" * 65}),
        ("audit.egress.list/since-garbage", "/v1/audit/egress", {"since": "yesterday"}),
        ("audit.egress.list/since-empty", "/v1/audit/egress", {"since": ""}),
        ("audit.egress.list/since-bad-date", "/v1/audit/egress", {"since": "2026-02-30T00:00:00Z"}),
        (
            "audit.egress.list/since-underflows-in-utc",
            "/v1/audit/egress",
            {"since": "0001-01-01T00:00:00+14:00"},
        ),
        ("audit.egress.list/until-garbage", "/v1/audit/egress", {"until": "tomorrow"}),
        ("audit.egress.list/until-epoch-number", "/v1/audit/egress", {"until": "1772280000"}),
        (
            "audit.egress.list/until-overflows-in-utc",
            "/v1/audit/egress",
            {"until": "9999-12-31T23:59:59-14:00"},
        ),
        ("audit.egress.list/verdict-unknown", "/v1/audit/egress", {"verdict": "maybe"}),
        ("audit.egress.list/mode-unknown", "/v1/audit/egress", {"mode": "block"}),
        ("audit.egress.list/protocol-unknown", "/v1/audit/egress", {"protocol": "udp"}),
        ("audit.egress.list/allowed-not-boolean", "/v1/audit/egress", {"allowed": "maybe"}),
        ("audit.egress.list/cidr-garbage", "/v1/audit/egress", {"cidr": "not-a-network"}),
        ("audit.egress.list/vm-id-too-long", "/v1/audit/egress", {"vm_id": "vm_" + "0" * 62}),
        ("audit.egress.list/host-too-long", "/v1/audit/egress", {"host": "h" * 256}),
        ("auth.poll/code-missing", "/v1/auth/device/poll", {}),
        ("auth.poll/code-garbage", "/v1/auth/device/poll", {"code": "garbage"}),
        ("auth.poll/code-empty", "/v1/auth/device/poll", {"code": ""}),
        ("auth.poll/code-too-long", "/v1/auth/device/poll", {"code": "A" * 33}),
    ]
    for case_id, path, params in filters:
        auth = None if path == "/v1/auth/device/poll" else "alice"
        out.append(Case(case_id, "GET", path, 400, "invalid_parameter", params=params, auth=auth))
    return out


# --- Authorization: missing or invalid, on every authenticated endpoint, with a request that would work ---

AUTHED_REQUESTS: list[tuple[str, str, str, Any]] = [
    ("users.me", "GET", "/v1/users/me", NO_BODY),
    ("auth.approve", "POST", "/v1/auth/device/approve", {"code": "<pending_code>"}),
    ("env.list", "GET", "/v1/env", NO_BODY),
    ("env.get", "GET", "/v1/env/SEEDED_A", NO_BODY),
    ("env.put", "PUT", "/v1/env/BAD_INPUT_NEW", {"value": "x"}),
    ("env.delete", "DELETE", "/v1/env/SEEDED_A", NO_BODY),
    ("secrets.list", "GET", "/v1/secrets", NO_BODY),
    (
        "secrets.create",
        "POST",
        "/v1/secrets",
        {"name": "fresh", "secret": SECRET_VALUE, "env_var": "FRESH_TOKEN"},
    ),
    ("secrets.get", "GET", "/v1/secrets/<a_secret>", NO_BODY),
    ("secrets.update", "PATCH", "/v1/secrets/<a_secret>", {"secret": SECRET_VALUE + "-new"}),
    ("secrets.delete", "DELETE", "/v1/secrets/<a_secret>", NO_BODY),
    ("egress.policy.get", "GET", "/v1/egress/policy", NO_BODY),
    ("egress.policy.put", "PUT", "/v1/egress/policy", {"mode": "warn"}),
    ("egress.rules.list", "GET", "/v1/egress/rules", NO_BODY),
    ("egress.rules.create", "POST", "/v1/egress/rules", {"host": "fresh.example.com"}),
    ("egress.rules.get", "GET", "/v1/egress/rules/<a_rule>", NO_BODY),
    ("egress.rules.delete", "DELETE", "/v1/egress/rules/<a_rule>", NO_BODY),
    ("audit.egress.list", "GET", "/v1/audit/egress", NO_BODY),
]

UNKNOWN_TOKEN = "corral_live_" + "A" * 43  # shaped like a real key, issued to no one
AUTH_HEADERS: dict[str, str | None] = {
    "missing": None,
    "empty": "",
    "scheme-only": "Bearer",
    "basic": "Basic dXNlcjpwYXNzd29yZA==",
    "garbage-token": "Bearer not-a-token",
    "unknown-token": f"Bearer {UNKNOWN_TOKEN}",
    "no-scheme": "<alice_token>",
    "other-scheme": "Token <alice_token>",
    "tampered-token": "Bearer <alice_token>x",
    "truncated-token": "Bearer <alice_token_truncated>",
    "two-tokens": "Bearer <alice_token> <alice_token>",
    "huge-token": "Bearer corral_live_" + "A" * 4000,
}
ON_EVERY_ENDPOINT = ("missing", "basic", "garbage-token", "unknown-token", "no-scheme")


def auth_cases() -> list[Case]:
    out: list[Case] = []
    for name, method, path, body in AUTHED_REQUESTS:
        variants = AUTH_HEADERS if name in ("users.me", "env.put") else ON_EVERY_ENDPOINT
        for label in variants:
            value = AUTH_HEADERS[label]
            headers = {} if value is None else {"Authorization": value}
            out.append(Case(f"{name}/auth-{label}", method, path, 401, "unauthorized", body=body, headers=headers,
                            auth=None))  # fmt: skip
    return out


CASES = [
    *(case for ep in BODY_ENDPOINTS for case in body_cases(ep)),
    *SEMANTIC_CASES,
    *no_body_size_cases(),
    *id_cases(),
    *list_cases(),
    *auth_cases(),
]


def test_case_ids_are_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


# --- the test -----------------------------------------------------------------------------------------------


def error_problem(resp: httpx.Response, status: int, code: str) -> str | None:
    """Why ``resp`` is not exactly ``status`` with the envelope ``{"error": {"code": code, "message"}}``."""
    got = f"expected {status} {code}, got {resp.status_code} {resp.text[:300]!r}"
    if resp.status_code != status:
        return got
    if resp.headers.get("content-type", "").split(";")[0] != "application/json":
        return f"{got} with Content-Type {resp.headers.get('content-type')!r}"
    try:
        body = resp.json()
    except ValueError:
        return f"{got}: not JSON"
    if not isinstance(body, dict) or set(body) != {"error"}:
        return f"{got}: not the error envelope"
    error = body["error"]
    if not isinstance(error, dict) or set(error) != {"code", "message"}:
        return f"{got}: the error is not exactly code and message"
    if error["code"] != code:
        return got
    if not isinstance(error["message"], str) or not error["message"].strip():
        return f"{got}: no message"
    return None


def assert_error(resp: httpx.Response, status: int, code: str) -> None:
    problem = error_problem(resp, status, code)
    assert problem is None, problem


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(world: World, case: Case) -> None:
    rows_before = world.db_state()
    resp = case.send(world)
    rows_after = world.db_state()
    # Listing afterwards shows the same as after the previous case (cases run one after the other, and
    # nothing else writes in between), so listing once per case is enough.
    api_before, world.api_seen = world.api_seen, world.api_state()

    problems = [] if (problem := error_problem(resp, case.status, case.code)) is None else [problem]
    changed = sorted(name for name in rows_before if rows_before[name] != rows_after[name])
    if changed:
        problems.append(f"the failed request changed rows of {changed}")
    changed = sorted(name for name in api_before if api_before[name] != world.api_seen[name])
    if changed:
        problems.append(f"the failed request changed what the API lists: {changed}")
    problems += [
        f"{value!r} leaked" for value in (SECRET_VALUE, BOB_SECRET_VALUE, *BOB_MARKERS) if value in resp.text
    ]
    if problems:
        pytest.fail(f"{case!r}\n" + "\n".join(problems), pytrace=False)


# --- beyond single requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "not_found"),
    [
        pytest.param("/v1/secrets", {"name": "a\x00b"}, None, id="secrets.list-name"),
        pytest.param("/v1/egress/rules", {"host": "a\x00b"}, None, id="egress.rules.list-host"),
        pytest.param("/v1/egress/rules", {"name": "a\x00b"}, None, id="egress.rules.list-name"),
        pytest.param("/v1/egress/rules", {"cidr": "a\x00b"}, None, id="egress.rules.list-cidr"),
        pytest.param("/v1/audit/egress", {"host": "a\x00b"}, None, id="audit.egress.list-host"),
        pytest.param("/v1/audit/egress", {"vm_id": "a\x00b"}, None, id="audit.egress.list-vm_id"),
        pytest.param("/v1/env/SEEDED%00A", {}, "env_not_found", id="env.get-key"),
        pytest.param("/v1/secrets/sec_%00", {}, "secret_not_found", id="secrets.get-id"),
        pytest.param("/v1/egress/rules/egr_%00", {}, "egress_rule_not_found", id="egress.rules.get-id"),
    ],
)
def test_nul_in_a_query_or_path_value(
    world: World, path: str, params: dict[str, str], not_found: str | None
) -> None:
    """A value no row can hold (it has a NUL) finds nothing, or is refused as a bad parameter: on every
    database, never a 500 (PostgreSQL refuses NUL in text, SQLite does not)."""
    rows_before = world.db_state()
    resp = world.alice.client.get(path, params=params)
    assert world.db_state() == rows_before
    if resp.status_code == 400:
        assert_error(resp, 400, "invalid_parameter")
    elif not_found is not None:
        assert_error(resp, 404, not_found)
    else:
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"data": [], "has_more": False, "cursor": None}


def test_other_users_objects_are_invisible(world: World) -> None:
    """Bob's objects: absent from alice's lists and filters, 404 by ID, and nothing of them in any answer."""
    client = world.alice.client
    bodies: list[str] = []
    for path, params in (
        ("/v1/secrets", {"name": "bob-secret"}),
        ("/v1/egress/rules", {"name": "bob-rule"}),
        ("/v1/egress/rules", {"host": "bob-only.example.com"}),
        ("/v1/env", {"limit": "200"}),
        ("/v1/secrets", {"limit": "200"}),
        ("/v1/egress/rules", {"limit": "200"}),
        ("/v1/audit/egress", {"limit": "500"}),
    ):
        resp = client.get(path, params=params)
        assert resp.status_code == 200, resp.text
        bodies.append(resp.text)
        ids = {item["id"] for item in resp.json()["data"]}
        assert not ids & {world.marks["b_secret"], world.marks["b_rule"]}
    for value in (SECRET_VALUE, BOB_SECRET_VALUE, *BOB_MARKERS):
        assert all(value not in body for body in bodies), value
    # and bob still has all of them, untouched by alice's attempts
    with world.server.client(world.bob.token) as bob:
        assert bob.get(f"/v1/secrets/{world.marks['b_secret']}").json()["name"] == "bob-secret"
        assert bob.get(f"/v1/egress/rules/{world.marks['b_rule']}").json()["name"] == "bob-rule"
        assert bob.get("/v1/env/BOB_ONLY").json()["value"] == "bob env value"
    # a device code bob approved: alice cannot take it over, and it still signs the device in as bob
    with world.server.client() as anon:
        code = anon.post("/v1/auth/device/code").json()["data"]["code"]
        assert world.bob.client.post("/v1/auth/device/approve", json={"code": code}).status_code == 200
        assert_error(client.post("/v1/auth/device/approve", json={"code": code}), 409, "device_code_used")
        poll = anon.get("/v1/auth/device/poll", params={"code": code}).json()["data"]
    assert poll["status"] == "authorized"
    with world.server.client(poll["token"]) as device:
        assert device.get("/v1/users/me").json()["id"] == world.bob.user["id"]


def test_secret_value_never_appears_in_any_response(world: World) -> None:
    """Reads, writes and every kind of error caused by the secret field: the value is in none of them."""
    client = world.alice.client
    value = SECRET_VALUE + "-fresh"
    sid = world.marks["alice-two"]
    bodies: list[str] = []

    def keep(resp: httpx.Response) -> httpx.Response:
        bodies.append(resp.text)
        return resp

    created = keep(
        client.post("/v1/secrets", json={"name": "hygiene", "secret": value, "env_var": "HYGIENE"})
    )
    assert created.status_code == 201, created.text
    hid = created.json()["id"]
    keep(client.get(f"/v1/secrets/{hid}"))
    for params in ({}, {"sort": "name"}, {"order": "asc"}, {"name": "hygiene"}):
        keep(client.get("/v1/secrets", params=params))
    assert keep(client.patch(f"/v1/secrets/{hid}", json={"secret": value + "-2"})).status_code == 200
    assert keep(client.patch(f"/v1/secrets/{hid}", json={"comment": "c"})).status_code == 200
    errors: list[dict[str, Any]] = [
        {"secret": [value]},
        {"secret": {"value": value}},
        {"secret": {value: value}},
        {"secret": value * 2000},
        {"secret": value, "unexpected": 1},
        {"secret": value, "hosts": ["bad host!"]},
        {"secret": value, "env_var": "lower"},
        {"secret": value, "env_var": "ALICE_ONE"},  # 409
    ]
    targets: list[tuple[str, str, dict[str, Any]]] = [
        ("PATCH", f"/v1/secrets/{sid}", {}),
        ("POST", "/v1/secrets", {"name": "hygiene-2", "env_var": "HYGIENE_2"}),
    ]
    for body in errors:
        for method, path, base in targets:
            resp = keep(client.request(method, path, json={**base, **body}))
            assert 400 <= resp.status_code < 500, (method, body, resp.text)
    resp = keep(client.patch(f"/v1/secrets/{sid}", json={"secret": value, "name": "renamed"}))
    assert resp.status_code == 422, resp.text
    raw_errors = [
        b'{"secret": "' + value.encode() + b'",',  # invalid JSON
        b'{"secret": "' + value.encode() + b'\\ud800"}',  # lone surrogate
        b'["' + value.encode() + b'"]',  # not an object
        b'{"secret": "' + value.encode() + b'"}' + b" " * MIB,  # too large
    ]
    for raw in raw_errors:
        resp = keep(
            client.patch(f"/v1/secrets/{sid}", content=raw, headers={"Content-Type": "application/json"})
        )
        assert resp.status_code in (400, 422), resp.text
    with world.server.client() as anon:  # unauthenticated
        keep(anon.post("/v1/secrets", json={"name": "x", "secret": value, "env_var": "X"}))
    for text in bodies:
        assert value not in text
        assert SECRET_VALUE not in text
    assert value not in world.server.log.read_text(errors="replace")
    assert client.delete(f"/v1/secrets/{hid}").status_code == 204
