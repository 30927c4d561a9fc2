"""Rate limiting per API key (and per client address where there is no key): 429 with Retry-After."""

from __future__ import annotations

from pathlib import Path

from tests.support import running_server, signup


def test_per_key_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    with running_server(
        tmp_path,
        CORRAL_RATE_LIMIT_PER_MINUTE="6",
        CORRAL_RATE_LIMIT_BURST="5",
    ) as server:
        alice, bob = signup(server), signup(server)
        statuses = [alice.client.get("/v1/env").status_code for _ in range(7)]
        assert statuses[:5] == [200] * 5
        assert statuses[5:] == [429, 429]
        limited = alice.client.get("/v1/env")
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        retry_after = int(limited.headers["Retry-After"])
        assert 1 <= retry_after <= 10  # one token comes back every 10 s at 6/minute
        # another key has its own bucket
        assert bob.client.get("/v1/env").status_code == 200
        alice.client.close()
        bob.client.close()


def test_anonymous_endpoints_are_limited_per_address(tmp_path: Path) -> None:
    with (
        running_server(
            tmp_path, CORRAL_ANON_RATE_LIMIT_PER_MINUTE="60", CORRAL_ANON_RATE_LIMIT_BURST="3"
        ) as server,
        server.client() as anon,
    ):
        statuses = [anon.post("/v1/auth/device/code").status_code for _ in range(5)]
        assert statuses[:3] == [200, 200, 200]
        assert 429 in statuses[3:]
        # a wrong key costs from the same budget: guessing keys is limited too
        bad = anon.get("/v1/env", headers={"Authorization": "Bearer corral_live_guess-0000000000000000"})
        assert bad.status_code == 429
        assert "Retry-After" in bad.headers
