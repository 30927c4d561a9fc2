"""Rate-limit keys for callers without an API key."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from corral.api.deps import client_key


def _request(host: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "headers": [], "client": (host, 1234)})


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # same /64, same bucket
        ("::ffff:10.0.0.1", "::ffff:10.0.0.1"),
        ("testclient", "testclient"),
    ],
)
def test_ipv6_clients_share_a_bucket_per_64(host: str, key: str) -> None:
    assert client_key(_request(host)) == key
