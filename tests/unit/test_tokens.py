"""API tokens: shape, hashing and the cheap shape check."""

from __future__ import annotations

import hashlib
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.security.tokens import TOKEN_PREFIX, hash_token, looks_like_token, new_token


def test_new_token_shape() -> None:
    token = new_token()
    assert token.startswith(TOKEN_PREFIX)
    body = token.removeprefix(TOKEN_PREFIX)
    assert len(body) == 43  # 32 bytes, url-safe base64 without padding
    assert set(body) <= set(string.ascii_letters + string.digits + "-_")
    assert looks_like_token(token)


def test_new_tokens_differ() -> None:
    assert len({new_token() for _ in range(1000)}) == 1000


@given(st.text(max_size=100))
def test_hash_is_sha256_hex(token: str) -> None:
    digest = hash_token(token)
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert len(digest) == 64
    assert hash_token(token) == digest


def test_hash_does_not_contain_the_token() -> None:
    token = new_token()
    assert token not in hash_token(token)
    assert hash_token(token) != hash_token(token + "x")


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (TOKEN_PREFIX + "x" * 43, True),
        (TOKEN_PREFIX + "x" * 9, True),  # 21 characters
        (TOKEN_PREFIX + "x" * 8, False),  # 20 characters
        (TOKEN_PREFIX + "x" * 187, True),  # 199 characters
        (TOKEN_PREFIX + "x" * 188, False),  # 200 characters
        (TOKEN_PREFIX, False),
        ("", False),
        ("x" * 50, False),
        ("corral_test_" + "x" * 43, False),
        ("CORRAL_LIVE_" + "x" * 43, False),
        (" " + TOKEN_PREFIX + "x" * 43, False),
    ],
)
def test_looks_like_token(token: str, expected: bool) -> None:
    assert looks_like_token(token) is expected
