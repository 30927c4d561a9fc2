"""The SDK sends an Idempotency-Key with every VM create, and so sends a create again after a connection that
broke once the request went out (the server answers a repeat with the first VM); other POSTs are not."""

from __future__ import annotations

import asyncio

import httpx
import pytest

import corral
from corral.sdk import async_client, sync_client

VM = {
    "id": "vm_abc",
    "name": "dev",
    "status": "pending",
    "status_detail": "queued",
    "created_at": "2026-02-28T12:00:00Z",
    "updated_at": "2026-02-28T12:00:00Z",
    "image": "debian:bookworm",
    "vcpus": 1,
    "mem_mib": 1024,
    "disk_mib": 4096,
}


@pytest.fixture(autouse=True)
def no_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    async def async_sleep(_: float) -> None:
        return None

    monkeypatch.setattr(sync_client, "sleep", lambda _: None)
    monkeypatch.setattr(async_client, "sleep", async_sleep)


def _flaky(keys: list[str | None]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("idempotency-key"))
        if len(keys) == 1:
            raise httpx.ReadError("connection reset after the request went out", request=request)
        return httpx.Response(201, json=VM)

    return httpx.MockTransport(handler)


def test_a_create_is_sent_again_with_the_same_key() -> None:
    keys: list[str | None] = []
    with corral.Client("k", "http://corral.test", transport=_flaky(keys)) as c:
        assert c.vms.create(name="dev", public_key="ssh-ed25519 AAAA").id == "vm_abc"
    assert len(keys) == 2
    assert keys[0] is not None
    assert len(keys[0]) == 32
    assert keys[0] == keys[1]
    # each create has a key of its own; one given by the caller is sent as it is
    keys.clear()
    with corral.Client("k", "http://corral.test", transport=_flaky(keys)) as c:
        c.vms.create(name="dev", public_key="ssh-ed25519 AAAA", idempotency_key="mine-1")
        c.vms.create(name="dev", public_key="ssh-ed25519 AAAA")
    assert keys[:2] == ["mine-1", "mine-1"]
    assert keys[2] not in (None, "mine-1")


def test_the_async_client_too() -> None:
    keys: list[str | None] = []

    async def main() -> str:
        async with corral.AsyncClient("k", "http://corral.test", transport=_flaky(keys)) as c:
            vm = await c.vms.create(name="dev", public_key="ssh-ed25519 AAAA")
            return vm.id

    assert asyncio.run(main()) == "vm_abc"
    assert len(keys) == 2
    assert keys[0] == keys[1]


def test_a_post_without_a_key_is_not_sent_again() -> None:
    keys: list[str | None] = []
    with (
        corral.Client("k", "http://corral.test", transport=_flaky(keys)) as c,
        pytest.raises(corral.APIConnectionError),
    ):
        c.secrets.create(name="gh", secret="x", env_var="GH")
    assert keys == [None]
