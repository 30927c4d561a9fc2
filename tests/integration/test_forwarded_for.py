"""X-Forwarded-For is believed only from the proxies the operator names (finding L1).

Before: uvicorn's default trusted any client on loopback, so rotating the header gave every anonymous request
a fresh rate-limit bucket (40 password guesses on /activate, none refused).
"""

from __future__ import annotations

from pathlib import Path

from tests.support import Server, running_server


def _guess(server: Server, n: int, forwarded: str) -> int:
    # a new email each time: the per-account lockout stays out of it, only the per-address limit counts
    form = {"code": "ABCD-1234", "email": f"nobody-{n}-{forwarded}@example.com", "password": "wrong-password"}
    with server.client() as anon:
        resp = anon.post("/activate", data=form, headers={"X-Forwarded-For": forwarded})
    assert resp.status_code in (401, 429), resp.text
    return resp.status_code


def test_forwarded_for_from_an_untrusted_peer_is_ignored(tmp_path: Path) -> None:
    with running_server(
        tmp_path, CORRAL_ANON_RATE_LIMIT_PER_MINUTE="1", CORRAL_ANON_RATE_LIMIT_BURST="3"
    ) as server:
        statuses = [_guess(server, n, f"198.51.100.{n}") for n in range(6)]
        assert statuses[:3] == [401, 401, 401]
        assert statuses[3:] == [429, 429, 429]  # one bucket: the socket's peer, 127.0.0.1


def test_forwarded_for_from_a_configured_proxy_is_the_client(tmp_path: Path) -> None:
    with running_server(
        tmp_path,
        CORRAL_ANON_RATE_LIMIT_PER_MINUTE="1",
        CORRAL_ANON_RATE_LIMIT_BURST="3",
        CORRAL_TRUSTED_PROXIES="127.0.0.1/32",
    ) as server:
        # behind a trusted proxy, each client has its own bucket...
        assert [_guess(server, n, f"198.51.100.{n}") for n in range(6)] == [401] * 6
        # ...keyed on the address the proxy saw (the right-most hop), not on what the client claimed before it
        chain = [_guess(server, n, f"203.0.113.{n}, 192.0.2.7") for n in range(5)]
        assert chain == [401, 401, 401, 429, 429]
