"""``GET /v1/audit/egress``: every documented filter, alone and combined, on rows the proxy would write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.integration.audit_rows import insert_events
from tests.support import Account, Server

T0 = datetime(2026, 2, 28, 12, 0, 0, tzinfo=UTC)
EVENTS: list[dict[str, Any]] = [
    # name, then the row
    {"timestamp": T0, "vm_id": "vm_aaaaaaaaaaaa", "host": "Api.GitHub.com.", "cidr": None, "protocol": "tls",
     "verdict": "allowed", "allowed": True, "mode": "enforce"},
    {"timestamp": T0 + timedelta(seconds=10), "vm_id": "vm_aaaaaaaaaaaa", "host": "evil.example.com", "cidr": None,
     "protocol": "http", "verdict": "denied", "allowed": False, "mode": "enforce"},
    {"timestamp": T0 + timedelta(seconds=20), "vm_id": "vm_bbbbbbbbbbbb", "host": None, "cidr": "10.1.2.3/32",
     "protocol": "tcp", "verdict": "allowed", "allowed": True, "mode": "enforce"},
    {"timestamp": T0 + timedelta(seconds=30), "vm_id": "vm_bbbbbbbbbbbb", "host": "pypi.example.org", "cidr": None,
     "protocol": "tls", "verdict": "denied", "allowed": True, "mode": "warn"},
    {"timestamp": T0 + timedelta(seconds=40), "vm_id": "vm_bbbbbbbbbbbb", "host": None, "cidr": "192.168.7.0/24",
     "protocol": "tcp", "verdict": "denied", "allowed": False, "mode": "enforce"},
    {"timestamp": T0 + timedelta(seconds=50), "vm_id": "vm_aaaaaaaaaaaa", "host": None, "cidr": "2001:db8::1/128",
     "protocol": "tcp", "verdict": "allowed", "allowed": True, "mode": "enforce"},
]  # fmt: skip


@pytest.fixture(scope="module")
def audited(server: Server) -> Account:
    from tests.support import signup

    acct = signup(server)
    insert_events(server, str(acct.user["id"]), EVENTS)
    return acct


def _seconds(account: Account, **params: str | int) -> list[int]:
    """The matching events, as seconds after T0, in the order the API returns them."""
    resp = account.client.get("/v1/audit/egress", params=params)
    assert resp.status_code == 200, resp.text
    return [int(e["timestamp"][17:19]) for e in resp.json()["data"]]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, [50, 40, 30, 20, 10, 0]),
        ({"order": "asc"}, [0, 10, 20, 30, 40, 50]),
        ({"vm_id": "vm_bbbbbbbbbbbb"}, [40, 30, 20]),
        ({"verdict": "denied"}, [40, 30, 10]),
        ({"verdict": "allowed"}, [50, 20, 0]),
        ({"allowed": "true"}, [50, 30, 20, 0]),  # warn mode: denied by policy, yet permitted
        ({"allowed": "false"}, [40, 10]),
        ({"mode": "warn"}, [30]),
        ({"mode": "enforce", "verdict": "denied"}, [40, 10]),
        ({"host": "API.GITHUB.COM"}, [0]),  # stored as api.github.com
        ({"host": "api.github.com."}, [0]),
        ({"protocol": "tcp"}, [50, 40, 20]),
        ({"protocol": "http"}, [10]),
        ({"cidr": "10.0.0.0/8"}, [20]),
        ({"cidr": "192.168.0.0/16"}, [40]),
        ({"cidr": "192.168.7.128/25"}, []),  # the event's /24 is not inside a /25
        ({"cidr": "0.0.0.0/0"}, [40, 20]),
        ({"cidr": "2001:db8::/32"}, [50]),
        ({"cidr": "::/0"}, [50]),  # IPv6 networks hold no IPv4 events
        ({"cidr": "::ffff:0:0/96"}, []),
        ({"since": "2026-02-28T12:00:20Z"}, [50, 40, 30]),  # exclusive
        ({"until": "2026-02-28T12:00:20Z"}, [10, 0]),  # exclusive
        ({"since": "2026-02-28T12:00:05", "until": "2026-02-28T13:00:35+01:00"}, [30, 20, 10]),  # naive = UTC
        ({"vm_id": "vm_aaaaaaaaaaaa", "protocol": "tls", "allowed": "true"}, [0]),
        ({"vm_id": "vm_nonexistent0"}, []),
    ],
)
def test_filters(audited: Account, params: dict[str, str], expected: list[int]) -> None:
    assert _seconds(audited, **params) == expected


def test_other_users_events_are_invisible(audited: Account, other_account: Account) -> None:
    assert _seconds(other_account) == []
    assert _seconds(other_account, vm_id="vm_aaaaaaaaaaaa") == []


def test_paging_over_filtered_events(audited: Account) -> None:
    first = audited.client.get("/v1/audit/egress", params={"verdict": "denied", "limit": 2}).json()
    assert first["has_more"] is True
    assert len(first["data"]) == 2
    rest = audited.client.get(
        "/v1/audit/egress", params={"verdict": "denied", "limit": 2, "cursor": first["cursor"]}
    ).json()
    assert rest["has_more"] is False
    assert rest["cursor"] is None
    assert [e["timestamp"] for e in first["data"] + rest["data"]] == [
        "2026-02-28T12:00:40Z",
        "2026-02-28T12:00:30Z",
        "2026-02-28T12:00:10Z",
    ]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"verdict": "maybe"}, "invalid_parameter"),
        ({"mode": "block"}, "invalid_parameter"),
        ({"protocol": "udp"}, "invalid_parameter"),
        ({"allowed": "perhaps"}, "invalid_parameter"),
        ({"cidr": "not-a-network"}, "invalid_parameter"),
        ({"since": "yesterday"}, "invalid_parameter"),
        ({"until": "2026-13-01T00:00:00Z"}, "invalid_parameter"),
        ({"limit": "501"}, "invalid_parameter"),
        ({"order": "sideways"}, "invalid_parameter"),
        ({"cursor": "nonsense"}, "invalid_cursor"),
    ],
)
def test_bad_filters_are_400(audited: Account, params: dict[str, str], code: str) -> None:
    resp = audited.client.get("/v1/audit/egress", params=params)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == code


def test_hosts_are_stored_normalised(audited: Account) -> None:
    hosts = {e["host"] for e in audited.client.get("/v1/audit/egress").json()["data"]}
    assert "api.github.com" in hosts
    assert "Api.GitHub.com." not in hosts
