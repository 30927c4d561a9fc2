"""Passwords hashed with argon2id."""

from __future__ import annotations

import os
import threading

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()
# Each hash takes 64 MiB for a moment: at most this many at once, whatever the thread pool's size.
_slots = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))


def hash_password(password: str) -> str:
    with _slots:
        return _hasher.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    with _slots:
        try:
            return _hasher.verify(stored_hash, password)
        except (VerificationError, InvalidHashError):
            return False
