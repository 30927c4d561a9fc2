"""Paging through the HTTP API: any limit, either order, every sort field; each row exactly once."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import Account

ROWS = 23


def _page_all(account: Account, path: str, params: dict[str, str | int]) -> list[str]:
    ids: list[str] = []
    cursor: str | None = None
    for _ in range(ROWS + 2):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        resp = account.client.get(path, params=query)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert len(body["data"]) <= int(params["limit"])
        ids.extend(item["id"] for item in body["data"])
        if not body["has_more"]:
            assert body["cursor"] is None
            return ids
        cursor = body["cursor"]
    raise AssertionError("paging did not finish")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limit=st.integers(min_value=1, max_value=30),
    order=st.sampled_from(["asc", "desc"]),
    sort=st.sampled_from(["created_at", "host"]),
)
def test_rules_page_exactly_once(account: Account, limit: int, order: str, sort: str) -> None:
    existing = account.client.get("/v1/egress/rules", params={"limit": 200}).json()["data"]
    if len(existing) < ROWS:
        for n in range(ROWS - len(existing)):
            body = {"host": f"h{n % 5}.example.com"} if n % 4 else {"cidr": f"10.{n}.0.0/16"}
            assert account.client.post("/v1/egress/rules", json=body).status_code == 201
    everything = {
        r["id"] for r in account.client.get("/v1/egress/rules", params={"limit": 200}).json()["data"]
    }
    ids = _page_all(account, "/v1/egress/rules", {"limit": limit, "order": order, "sort": sort})
    assert len(ids) == len(set(ids)) == ROWS
    assert set(ids) == everything


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(min_value=1, max_value=30))
def test_env_page_exactly_once(account: Account, limit: int) -> None:
    for n in range(ROWS):
        account.client.put(f"/v1/env/VAR_{n}", json={"value": str(n)})
    ids = _page_all(account, "/v1/env", {"limit": limit})
    assert len(ids) == len(set(ids)) == ROWS


def test_the_returned_cursor_alone_continues_the_listing(account: Account) -> None:
    for name in ("cherry", "apple", "banana"):
        body = {"name": f"{name}-cursor", "secret": "x", "env_var": f"{name.upper()}_CURSOR"}
        assert account.client.post("/v1/secrets", json=body).status_code == 201
    first = account.client.get("/v1/secrets", params={"sort": "name", "order": "asc", "limit": 1}).json()
    second = account.client.get("/v1/secrets", params={"cursor": first["cursor"], "limit": 1}).json()
    third = account.client.get("/v1/secrets", params={"cursor": second["cursor"], "limit": 1}).json()
    names = [page["data"][0]["name"] for page in (first, second, third)]
    assert names == ["apple-cursor", "banana-cursor", "cherry-cursor"]
    clash = account.client.get("/v1/secrets", params={"cursor": first["cursor"], "sort": "created_at"})
    assert clash.status_code == 400
    assert clash.json()["error"]["code"] == "invalid_cursor"
