"""Egress with PostgreSQL on the host's loopback (review D1): ``corral serve`` on a PostgreSQL that listens on
127.0.0.1 only (the URL ``scripts/pg-up`` prints), a VM behind the fake internet. The egress process lives in
the gateway's network namespace, where 127.0.0.1 is not the host; its store calls must still reach the
database: the allowed host is reached, the denied one is not, and both are audited, as on SQLite."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakenet import HOSTS, FakeInternet
from tests.sandbox.conftest import internet_env
from tests.support import REPO, node_server, signup
from tests.vmtools import create_ready, destroy, run

EVIL = HOSTS["evil.test"]


@pytest.fixture(scope="module")
def loopback_postgres() -> Iterator[str]:
    """A private PostgreSQL cluster listening on 127.0.0.1 (TCP) only; removed afterwards."""
    directory = Path(f"/tmp/corral-pg-egress-{secrets.token_hex(4)}")
    url = subprocess.run(
        [str(REPO / "scripts" / "pg-up"), str(directory)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert "@127.0.0.1:" in url, url
    try:
        yield url
    finally:
        subprocess.run([str(REPO / "scripts" / "pg-down"), str(directory)], capture_output=True, check=False)


def test_egress_allows_denies_and_audits_with_postgres_on_the_hosts_loopback(
    tmp_path: Path, internet: FakeInternet, loopback_postgres: str
) -> None:
    with node_server(
        tmp_path, database_url=loopback_postgres, **internet_env(internet, "100.127.93.0/30")
    ) as server:
        acct = signup(server)
        c = acct.client
        assert c.post("/v1/egress/rules", json={"host": "allowed.test"}).status_code == 201
        vm = create_ready(c)
        try:
            mark = internet.mark()
            allowed = run(c, vm["id"], "curl -sS -m 5 http://allowed.test/on-postgres")
            assert allowed["exit_code"] == 0, allowed
            assert '"host_addr": "198.18.1.1"' in allowed["stdout"] or "198.18.1.1" in allowed["stdout"]
            denied = run(c, vm["id"], "curl -sS -m 5 http://evil.test/on-postgres")
            assert denied["exit_code"] != 0
            assert [e for e in internet.events_since(mark) if e["addr"] == EVIL] == []
            deadline = time.monotonic() + 5
            while True:
                events = c.get("/v1/audit/egress", params={"vm_id": vm["id"], "limit": 100}).json()["data"]
                seen = {(e["host"], e["verdict"]) for e in events}
                if {
                    ("allowed.test", "allowed"),
                    ("evil.test", "denied"),
                } <= seen or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert ("allowed.test", "allowed") in seen, events
            assert ("evil.test", "denied") in seen, events
            ready = c.get("/readyz")
            assert ready.status_code == 200, ready.text
        finally:
            destroy(c, vm["id"])
            c.close()
