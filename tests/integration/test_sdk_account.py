"""The account's features through the SDK against a live ``corral serve`` (API only; also on PostgreSQL):
signup, the key's user, device login, environment variables, secrets, egress policy and rules, the egress
audit, usage, errors with the API's codes, pagination, and a 429 the client waits out."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import corral
from tests.integration.audit_rows import insert_events
from tests.support import Account, Server, running_server


def client_for(server: Server, account: Account) -> corral.Client:
    return corral.Client(account.token, server.url)


def test_signup_me_and_device_login(server: Server) -> None:
    email = f"sdk-{secrets.token_hex(5)}@example.com"
    with corral.Client(base_url=server.url) as anon:  # signup needs no key
        signup = anon.users.create(first_name="Sue", last_name="Dee", email=email, password="pw-123456789")
        assert anon.health().status == "ok"
        assert anon.ready().status == "ready"
        code = anon.device_login.request_code()
        assert anon.device_login.poll(code.code).status == "pending"
    assert signup.user.email == email
    assert signup.api_key.token
    with corral.Client(signup.api_key.token, server.url) as me:
        user = me.users.me()
        assert (user.id, user.first_name) == (signup.user.id, "Sue")
        assert user.created_at.tzinfo is not None
        assert me.device_login.approve(code.code).status == "approved"
    with corral.Client(base_url=server.url) as anon:
        polled = anon.device_login.poll(code.code)
    assert polled.status == "authorized"
    assert polled.token
    with corral.Client(polled.token, server.url) as device:
        assert device.users.me().id == signup.user.id
    with corral.Client("ck_wrong", server.url) as bad, pytest.raises(corral.AuthenticationError) as err:
        bad.users.me()
    assert (err.value.status, err.value.code) == (401, "unauthorized")


def test_env_and_secrets(server: Server, account: Account) -> None:
    with client_for(server, account) as c:
        for i in range(5):
            c.env.set(f"VAR_{i}", f"value {i}")
        assert c.env.get("VAR_3").value == "value 3"
        assert c.env.set("VAR_3", "changed").value == "changed"
        first = c.env.list(limit=2)
        assert len(first.data) == 2
        assert first.has_more
        assert sorted(v.key for v in c.env.iter(limit=2)) == [f"VAR_{i}" for i in range(5)]
        c.env.delete("VAR_0")
        with pytest.raises(corral.NotFoundError) as err:
            c.env.get("VAR_0")
        assert err.value.code == "env_not_found"
        with pytest.raises(corral.ValidationError):
            c.env.set("1BAD", "x")

        made = c.secrets.create(
            name="gh", secret="s3cret-value", env_var="GH_TOKEN", hosts=["api.github.com"]
        )
        assert made.proxy_value.startswith("CORRAL_PROXY_")
        assert "s3cret-value" not in made.model_dump_json()
        updated = c.secrets.update(made.id, comment="ci token", hosts=["*.github.com"])
        assert (updated.comment, updated.hosts) == ("ci token", ["*.github.com"])
        assert c.secrets.update(made.id, comment=None).comment is None
        assert [s.id for s in c.secrets.iter(name="gh")] == [made.id]
        with pytest.raises(corral.ConflictError) as conflict:
            c.secrets.create(name="gh", secret="x", env_var="OTHER")
        assert conflict.value.code == "secret_name_taken"
        c.secrets.delete(made.id)
        with pytest.raises(corral.NotFoundError) as gone:
            c.secrets.get(made.id)
        assert gone.value.code == "secret_not_found"


def test_egress_audit_and_usage(server: Server, account: Account) -> None:
    with client_for(server, account) as c:
        assert c.egress.get_policy().mode == "enforce"
        assert c.egress.set_policy("warn").mode == "warn"
        assert c.egress.get_policy().mode == "warn"
        host = c.egress.create_rule(host="api.example.com", name="example")
        net = c.egress.create_rule(cidr="203.0.113.0/24")
        assert c.egress.get_rule(host.id).host == "api.example.com"
        assert {r.id for r in c.egress.iter_rules(limit=1)} == {host.id, net.id}
        assert [r.id for r in c.egress.list_rules(cidr="203.0.113.0/24").data] == [net.id]
        with pytest.raises(corral.ValidationError):
            c.egress.create_rule(host="a.example", cidr="10.0.0.0/8")
        c.egress.delete_rule(net.id)
        with pytest.raises(corral.NotFoundError):
            c.egress.get_rule(net.id)

        start = datetime(2026, 1, 10, 12, tzinfo=UTC)
        rows = [
            {
                "timestamp": start + timedelta(minutes=i),
                "vm_id": "vm_sdkaudit",
                "host": f"h{i}.example",
                "cidr": None,
                "protocol": "tls",
                "verdict": "denied" if i % 2 else "allowed",
                "allowed": not i % 2,
                "mode": "enforce",
            }
            for i in range(5)
        ]
        insert_events(server, str(account.user["id"]), rows)
        events = list(c.audit.iter_egress(limit=2, order="asc"))
        assert [e.host for e in events] == [f"h{i}.example" for i in range(5)]
        assert events[0].timestamp == start
        denied = c.audit.list_egress(verdict="denied", since=start, until=start + timedelta(hours=1))
        assert [e.host for e in denied.data] == ["h3.example", "h1.example"]
        with pytest.raises(corral.BadRequestError) as bad:
            c.audit.list_egress(since="yesterday")
        assert bad.value.code == "invalid_parameter"

        usage = c.usage.get(from_="2026-01-01", to="2026-01-31")
        assert (usage.from_, usage.to) == ("2026-01-01", "2026-01-31")
        assert usage.data == []
        assert usage.total.cost_cents == 0
        assert usage.prices.cpu_second_cents >= 0


def test_the_async_client_against_the_server(server: Server, account: Account) -> None:
    async def main() -> list[str]:
        async with corral.AsyncClient(account.token, server.url) as c:
            await asyncio.gather(*(c.env.set(f"A_{i}", str(i)) for i in range(3)))
            keys = sorted([v.key async for v in c.env.iter(limit=1)])
            with pytest.raises(corral.NotFoundError):
                await c.secrets.get("sec_missing")
            assert (await c.users.me()).email == account.email
            return keys

    assert asyncio.run(main()) == ["A_0", "A_1", "A_2"]


def test_a_429_is_waited_out(tmp_path: Path) -> None:
    """One token a second, two at once: the third request in a row is answered 429 with Retry-After; both
    clients wait and get their answer."""
    with running_server(tmp_path, CORRAL_RATE_LIMIT_PER_MINUTE="60", CORRAL_RATE_LIMIT_BURST="2") as srv:
        with corral.Client(base_url=srv.url) as anon:
            token = anon.users.create(
                first_name="R", last_name="L", email="rl@example.com", password="pw-123456789"
            ).api_key.token
        with corral.Client(token, srv.url, max_retries=0) as impatient:
            impatient.env.list()
            impatient.env.list()
            with pytest.raises(corral.RateLimitError) as err:
                impatient.env.list()
        assert err.value.retry_after is not None
        assert err.value.retry_after >= 1
        with corral.Client(token, srv.url) as patient:
            assert [patient.env.list().has_more for _ in range(2)] == [False] * 2

        async def burst() -> int:
            async with corral.AsyncClient(token, srv.url) as c:
                pages = [await c.env.list() for _ in range(2)]
                return len(pages)

        assert asyncio.run(burst()) == 2
