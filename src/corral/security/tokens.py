"""API tokens: shown once, stored only as a SHA-256 hash (they carry 256 bits, so a slow hash adds nothing)."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "corral_live_"  # noqa: S105 (a prefix, not a token)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_token(token: str) -> bool:
    return token.startswith(TOKEN_PREFIX) and 20 < len(token) < 200
