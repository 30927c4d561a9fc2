"""Passwords hashed with argon2id. Each hash costs ~0.3 s here, so the hash is made once per module."""

from __future__ import annotations

import pytest

from corral.security.passwords import hash_password, verify_password

PASSWORD = "correct horse battery staple é"


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password(PASSWORD)


def test_hash_is_argon2id_and_hides_the_password(stored: str) -> None:
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored


def test_right_password_verifies(stored: str) -> None:
    assert verify_password(stored, PASSWORD) is True


def test_wrong_password_fails(stored: str) -> None:
    assert verify_password(stored, PASSWORD + " ") is False


@pytest.mark.parametrize("garbage", ["", "not a hash", "$argon2id$v=19$m=1,t=1,p=1$AAAA$BBBB", "$2b$12$abc"])
def test_a_damaged_hash_fails_without_raising(garbage: str) -> None:
    assert verify_password(garbage, PASSWORD) is False
