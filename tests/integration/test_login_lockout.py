"""Password guessing on /activate (and on password change) locks the account for a cool-down (finding L2).

Before: every guess was evaluated, at the per-address rate limit only. Now more than CORRAL_LOGIN_MAX_FAILURES
tries without a success lock the email: 429 with Retry-After, the same answer for an email no account has, and
the right password is refused too until the cool-down ends; a success resets the count.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support import Account, Server, _serve, fresh_database, running_server, signup

LOCK_S = 3


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running_server(tmp_path, CORRAL_LOGIN_MAX_FAILURES="3", CORRAL_LOGIN_LOCKOUT_S=str(LOCK_S)) as srv:
        yield srv


def _activate(server: Server, email: str, password: str, code: str = "ABCD-1234") -> httpx.Response:
    with server.client() as anon:
        return anon.post("/activate", data={"code": code, "email": email, "password": password})


def _device_code(server: Server) -> str:
    with server.client() as anon:
        code: str = anon.post("/v1/auth/device/code").json()["data"]["code"]
    return code


def test_activate_locks_an_email_after_repeated_failures(server: Server) -> None:
    alice = signup(server)
    nobody = "nobody-at-all@example.com"
    for email in (alice.email, nobody):
        assert [_activate(server, email, "wrong-guess").status_code for _ in range(3)] == [401] * 3
        locked = _activate(server, email, "wrong-guess")
        assert locked.status_code == 429, locked.text
        assert 1 <= int(locked.headers["Retry-After"]) <= LOCK_S
        assert "Too many wrong passwords for this email" in locked.text
    # the right password is refused as well while the lock holds; another email is not locked
    assert _activate(server, alice.email, alice.password, _device_code(server)).status_code == 429
    assert _activate(server, "someone-else@example.com", "wrong-guess").status_code == 401
    # after the cool-down the right password works again
    time.sleep(LOCK_S + 0.2)
    assert _activate(server, alice.email, alice.password, _device_code(server)).status_code == 200
    alice.client.close()


def test_a_success_resets_the_count(server: Server) -> None:
    alice = signup(server)
    for _ in range(3):
        assert _activate(server, alice.email, "wrong-guess").status_code == 401
        assert _activate(server, alice.email, "wrong-guess").status_code == 401
        assert _activate(server, alice.email, alice.password, _device_code(server)).status_code == 200
    alice.client.close()


def test_parallel_guesses_cannot_slip_past_the_count(server: Server) -> None:
    alice = signup(server)
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _: _activate(server, alice.email, "wrong").status_code, range(12)))
    assert sorted(statuses) == [401] * 3 + [429] * 9
    alice.client.close()


def test_password_change_counts_towards_the_lock(server: Server) -> None:
    alice: Account = signup(server)
    body = {"current_password": "wrong-guess", "new_password": "whatever-1234"}
    statuses = [alice.client.post("/v1/users/me/password", json=body).status_code for _ in range(4)]
    assert statuses == [422, 422, 422, 429]
    locked = alice.client.post(
        "/v1/users/me/password", json={"current_password": alice.password, "new_password": "whatever-1234"}
    )
    assert locked.status_code == 429
    assert locked.json()["error"]["code"] == "rate_limited"
    assert "Retry-After" in locked.headers
    assert _activate(server, alice.email, alice.password).status_code == 429  # the same account lock
    alice.client.close()


def test_the_lock_survives_a_restart(tmp_path: Path) -> None:
    env = {"CORRAL_NODE": "off", "CORRAL_LOGIN_MAX_FAILURES": "2", "CORRAL_LOGIN_LOCKOUT_S": "600"}
    with fresh_database(tmp_path) as url:
        with _serve(tmp_path, tmp_path / "data", url, env) as first:
            alice = signup(first)
            statuses = [_activate(first, alice.email, "wrong-guess").status_code for _ in range(3)]
            assert statuses == [401, 401, 429]
            alice.client.close()
        with _serve(tmp_path, tmp_path / "data", url, env) as second:
            locked = _activate(second, alice.email, alice.password, _device_code(second))
            assert locked.status_code == 429
            assert int(locked.headers["Retry-After"]) > 500
