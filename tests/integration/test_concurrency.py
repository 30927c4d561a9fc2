"""Concurrent requests racing on the same unique values: exactly one wins, the others get the documented 409,
never a 500; a device code's token is delivered once however many polls race for it."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from corral.domain.clock import FakeClock
from corral.services import egress, env
from corral.store.tables import EgressRule, EnvVar
from tests.integration.test_pagination_property import signup_user
from tests.support import Account, Server

RACERS = 12


def race(
    server: Server, token: str | None, send: Callable[[httpx.Client, int], httpx.Response]
) -> list[httpx.Response]:
    """Run ``send`` from RACERS threads released together, each on its own connection."""
    barrier = threading.Barrier(RACERS)

    def one(n: int) -> httpx.Response:
        with server.client(token) as client:
            barrier.wait()
            return send(client, n)

    with ThreadPoolExecutor(RACERS) as pool:
        return list(pool.map(one, range(RACERS)))


def outcome(responses: list[httpx.Response]) -> Counter[tuple[int, str]]:
    return Counter(
        (r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else "ok") for r in responses
    )


@pytest.mark.parametrize(
    ("make_body", "code"),
    [
        (lambda n: {"name": "same-name", "secret": "x", "env_var": f"VAR_{n}"}, "secret_name_taken"),
        (lambda n: {"name": f"name-{n}", "secret": "x", "env_var": "SAME_VAR"}, "env_var_taken"),
    ],
)
def test_secret_create_race(
    server: Server, account: Account, make_body: Callable[[int], object], code: str
) -> None:
    got = outcome(race(server, account.token, lambda c, n: c.post("/v1/secrets", json=make_body(n))))
    assert got == Counter({(201, "ok"): 1, (409, code): RACERS - 1})


def test_secret_patch_race(server: Server, account: Account) -> None:
    ids = [
        account.client.post("/v1/secrets", json={"name": f"p{n}", "secret": "x", "env_var": f"P_{n}"}).json()[
            "id"
        ]
        for n in range(RACERS)
    ]
    got = outcome(
        race(server, account.token, lambda c, n: c.patch(f"/v1/secrets/{ids[n]}", json={"env_var": "SAME"}))
    )
    assert got == Counter({(200, "ok"): 1, (409, "env_var_taken"): RACERS - 1})


def test_first_policy_put_race(server: Server, account: Account) -> None:
    modes = ["warn", "enforce"]
    got = outcome(
        race(server, account.token, lambda c, n: c.put("/v1/egress/policy", json={"mode": modes[n % 2]}))
    )
    assert got == Counter({(200, "ok"): RACERS})
    assert account.client.get("/v1/egress/policy").json()["mode"] in modes


def test_env_put_race_makes_one_variable(server: Server, account: Account) -> None:
    got = outcome(race(server, account.token, lambda c, n: c.put("/v1/env/RACED", json={"value": str(n)})))
    assert got == Counter({(200, "ok"): RACERS})
    assert [v["key"] for v in account.client.get("/v1/env").json()["data"]].count("RACED") == 1


def test_signup_race(server: Server) -> None:
    body = {"first_name": "R", "last_name": "C", "email": "race@example.com", "password": "s3cureP@ssword"}
    got = outcome(race(server, None, lambda c, n: c.post("/v1/users", json=body)))
    assert got == Counter({(201, "ok"): 1, (409, "email_taken"): RACERS - 1})


def test_device_code_token_is_delivered_once(server: Server, account: Account) -> None:
    with server.client() as anon:
        code = anon.post("/v1/auth/device/code").json()["data"]["code"]
    assert account.client.post("/v1/auth/device/approve", json={"code": code}).status_code == 200
    responses = race(server, None, lambda c, n: c.get("/v1/auth/device/poll", params={"code": code}))
    statuses = Counter(r.json()["data"]["status"] for r in responses)
    assert statuses == Counter({"authorized": 1, "expired": RACERS - 1})


def test_a_request_that_fails_after_writing_leaves_nothing(sessions: sessionmaker[Session]) -> None:
    """The one-transaction-per-request promise, at the store: an error after writes rolls all of them back
    (on SQLite this needs Corral's own BEGIN handling: pysqlite's would commit at a savepoint's release)."""
    clock = FakeClock()
    with sessions() as s, s.begin():
        user = signup_user(s, clock)

    def fail_after_writes() -> None:
        with sessions() as s, s.begin():
            env.put_env(s, clock, user, "ROLLED_BACK", "v")
            rule = egress.NewRule(name="r", host="a.example.com", cidr=None, comment=None)
            egress.create_rule(s, clock, user, rule)
            raise RuntimeError("the handler fails after writing")

    with pytest.raises(RuntimeError, match="fails after writing"):
        fail_after_writes()
    with sessions() as s:
        assert s.query(EnvVar).filter_by(user_id=user).count() == 0
        assert s.query(EgressRule).filter_by(user_id=user).count() == 0
