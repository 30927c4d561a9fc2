"""Encryption of secret values at rest: AES-256-GCM with a key kept outside the database.

The key file is created on first start with mode 0600. Each ciphertext is bound to its row by associated data
(the secret's ID and owner), so a ciphertext copied onto another row does not decrypt.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_FORMAT = b"\x01"  # version byte, so the scheme can change without guessing
_KEY_BYTES = 32
_NONCE_BYTES = 12


class SecretValue:
    """A secret's plaintext. Never shows itself in a repr, str or log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "SecretValue('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretValue) and secrets.compare_digest(
            _utf8(self._value), _utf8(other._value)
        )

    def __hash__(self) -> int:
        return hash(self._value)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class Cipher(Protocol):
    def encrypt(self, value: SecretValue, context: str) -> bytes: ...

    def decrypt(self, blob: bytes, context: str) -> SecretValue: ...


class DecryptionFailed(Exception):
    pass


class AesGcmCipher:
    def __init__(self, key: bytes) -> None:
        if len(key) != _KEY_BYTES:
            raise ValueError("key must be 32 bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "AesGcmCipher(<key hidden>)"

    def encrypt(self, value: SecretValue, context: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _FORMAT + nonce + self._aead.encrypt(nonce, value.reveal().encode(), context.encode())

    def decrypt(self, blob: bytes, context: str) -> SecretValue:
        if blob[:1] != _FORMAT or len(blob) < 1 + _NONCE_BYTES + 16:
            raise DecryptionFailed("unknown ciphertext format")
        nonce, body = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
        try:
            return SecretValue(self._aead.decrypt(nonce, body, context.encode()).decode())
        except InvalidTag:
            raise DecryptionFailed("ciphertext does not match its key or row") from None


def load_or_create_key(path: Path) -> bytes:
    """Read the key file, creating it (mode 0600, parents 0700) if it does not exist yet."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        # Write a temporary file, then link it into place: a concurrent starter never reads a half key.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(_KEY_BYTES))
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SystemExit(f"{path} must not be readable by group or others (mode {mode:o}); chmod 600 it")
    key = path.read_bytes()
    if len(key) != _KEY_BYTES:
        raise SystemExit(f"{path} does not hold a {_KEY_BYTES}-byte key")
    return key
