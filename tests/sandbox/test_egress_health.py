"""The egress process under attack and when it hangs, on real sandboxes behind the fake internet.

- Idle connections (review H5): one tenant's VM opens more silent connections than its cap. They are counted
  when accepted (those beyond the cap are closed at once), closed after the first-byte timeout, and freed
  for new ones; another tenant's VM meanwhile reaches an allowed host within a second; the egress log gets
  no tracebacks.
- A hung egress process (review D3): SIGSTOP it; ``/readyz`` turns 503 naming egress and resolver within
  seconds, the supervisor's watchdog kills it by its PID and starts a new one, allowed traffic works again,
  and nothing reached a denied host meanwhile."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakenet import HOSTS, FakeInternet
from tests.sandbox.conftest import internet_env
from tests.support import Account, Server, node_server, signup
from tests.vmtools import create_ready, destroy, run

PER_VM_CAP = 20
FIRST_BYTE_TIMEOUT = 3.0
ALLOWED, EVIL = HOSTS["allowed.test"], HOSTS["evil.test"]

# Run inside a sandbox: open N connections that never send a byte, then report which the proxy closed at
# once (refused at accept) and, after a wait, which it closed since (the first-byte timeout).
SILENT = r"""
import json, select, socket, sys, time
n, wait = int(sys.argv[1]), float(sys.argv[2])
socks = [socket.create_connection(("198.18.1.1", 80), timeout=3) for _ in range(n)]
def closed(s):
    r, _, _ = select.select([s], [], [], 0)
    return bool(r) and s.recv(1) == b""
time.sleep(1.0)
early = [i for i, s in enumerate(socks) if closed(s)]
time.sleep(wait)
late = [i for i, s in enumerate(socks) if i not in early and closed(s)]
print(json.dumps({"early": early, "late": late, "open": n - len(early) - len(late)}))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, internet: FakeInternet) -> Iterator[Server]:
    with node_server(
        tmp_path_factory.mktemp("egress-health"),
        CORRAL_EGRESS_MAX_CONNS_PER_VM=str(PER_VM_CAP),
        CORRAL_EGRESS_FIRST_BYTE_TIMEOUT_S=str(FIRST_BYTE_TIMEOUT),
        CORRAL_EGRESS_PROBE_INTERVAL_S="0.5",
        CORRAL_EGRESS_PROBE_TIMEOUT_S="1",
        **internet_env(internet, "100.127.92.0/30"),
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def tenants(server: Server) -> Iterator[list[tuple[Account, dict[str, Any]]]]:
    """Two accounts, each with allowed.test on its list and one VM."""
    out = []
    for name in ("Ann", "Bob"):
        acct = signup(server, first_name=name)
        assert acct.client.post("/v1/egress/rules", json={"host": "allowed.test"}).status_code == 201
        out.append((acct, create_ready(acct.client)))
    yield out
    for acct, vm in out:
        destroy(acct.client, vm["id"])
        acct.client.close()


def egress_log(server: Server) -> Path:
    return server.data_dir / "egress" / "egress.log"


def timed_get(client: httpx.Client, vm_id: str, url: str) -> tuple[int, float]:
    """curl ``url`` in the VM: (exit code, seconds curl took)."""
    out = run(client, vm_id, ["curl", "-sS", "-o", "/dev/null", "-m", "5", "-w", "%{time_total}", url])
    return out["exit_code"], float(out["stdout"] or "nan")


def test_silent_connections_are_capped_and_closed_while_others_keep_their_egress(
    server: Server, tenants: list[tuple[Account, dict[str, Any]]]
) -> None:
    (ann, ann_vm), (bob, bob_vm) = tenants
    log_before = egress_log(server).stat().st_size
    n = PER_VM_CAP + 15
    with (
        httpx.Client(base_url=server.url, headers=ann.client.headers, timeout=60) as c,
        ThreadPoolExecutor(1) as pool,
    ):
        # the silent connections from Ann's VM (the exec returns when the script is done); Bob's requests
        attack = pool.submit(
            run, c, ann_vm["id"], ["python3", "-c", SILENT, str(n), str(FIRST_BYTE_TIMEOUT + 3)]
        )
        time.sleep(2.0)  # the connections are open, the cap reached
        for _ in range(3):
            code, took = timed_get(bob.client, bob_vm["id"], "http://allowed.test/while-ann-holds-the-cap")
            assert code == 0
            assert took < 1.0, f"another tenant's request took {took:.2f} s during the attack"
        out = attack.result(timeout=60)
    assert out["exit_code"] == 0, out
    report = out["stdout"]
    result = json.loads(report)
    # counted at accept: the connections over the cap were closed at once, before any byte
    assert len(result["early"]) == n - PER_VM_CAP, result
    # the rest were closed by the first-byte timeout
    assert len(result["late"]) == PER_VM_CAP, result
    assert result["open"] == 0
    # and their slots are free again: Ann's own VM reaches the allowed host
    code, _ = timed_get(ann.client, ann_vm["id"], "http://allowed.test/after-the-attack")
    assert code == 0
    grown = egress_log(server).read_text(errors="replace")[log_before:]
    assert "Traceback" not in grown
    assert len(grown) < 20_000, f"the egress log grew by {len(grown)} bytes"


def _readyz(server: Server) -> httpx.Response:
    return httpx.get(f"{server.url}/readyz", timeout=5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_stopped_egress_is_noticed_restarted_and_lets_nothing_through(
    server: Server, internet: FakeInternet, tenants: list[tuple[Account, dict[str, Any]]]
) -> None:
    (ann, ann_vm), _ = tenants
    ready = _readyz(server)
    assert ready.status_code == 200, ready.text
    assert ready.json()["parts"]["egress"] == {"status": "ok", "detail": None}
    assert timed_get(ann.client, ann_vm["id"], "http://allowed.test/before-the-stop")[0] == 0
    pid_file = server.data_dir / "egress" / "egress.pid"
    stopped = int(pid_file.read_text())
    mark = internet.mark()
    os.kill(stopped, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        while (resp := _readyz(server)).status_code == 200:
            assert time.monotonic() < deadline, "/readyz still ready 5 s after the egress process stopped"
            time.sleep(0.2)
        assert resp.status_code == 503
        body = resp.json()
        assert body["error"]["code"] == "not_ready"
        assert "egress" in body["error"]["message"]
        assert body["parts"]["egress"]["status"] == "down"
        assert body["parts"]["store"]["status"] == "ok"
        # meanwhile, a denied host stays out of reach (nothing is let through undecided)
        out = run(
            ann.client,
            ann_vm["id"],
            "curl -sS -m 3 http://evil.test/while-stopped; curl -sS -m 3 http://198.18.1.4/",
        )
        assert out["exit_code"] != 0
        # the watchdog kills the stopped process and starts another one
        deadline = time.monotonic() + 30
        while _readyz(server).status_code != 200:
            assert time.monotonic() < deadline, "the egress process was not restarted within 30 s"
            time.sleep(0.3)
        assert not _alive(stopped), "the stopped egress process was left behind"
        assert int(pid_file.read_text()) != stopped
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(
                stopped, signal.SIGCONT
            )  # so the server can end it, if the test failed before the watchdog
    code, _ = timed_get(ann.client, ann_vm["id"], "http://allowed.test/after-the-restart")
    assert code == 0
    denied = run(ann.client, ann_vm["id"], "curl -sS -m 3 http://evil.test/after-the-restart")
    assert denied["exit_code"] != 0
    assert [e for e in internet.events_since(mark) if e["addr"] == EVIL] == []
    server_log = server.log.read_text(errors="replace")
    assert "stopped answering" in server_log
    assert "restart 1" in server_log
