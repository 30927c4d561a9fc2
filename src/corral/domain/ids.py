"""Prefixed, opaque resource IDs (``vm_k3mf9xvw2p``)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from enum import StrEnum

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case: no i, l, o, u
ID_BODY_LENGTH = 12  # 60 bits of randomness


class Prefix(StrEnum):
    VM = "vm"
    EGRESS_RULE = "egr"
    EGRESS_EVENT = "ee"
    SECRET = "sec"  # noqa: S105 (an ID prefix)
    SNAPSHOT = "snap"
    CHECKPOINT = "ckpt"
    AGENT = "agt"
    ENV = "env"
    USER = "usr"
    API_KEY = "key"


RandomChoice = Callable[[str], str]


def new_id(prefix: Prefix, choice: RandomChoice = secrets.choice) -> str:
    return f"{prefix.value}_" + "".join(choice(ALPHABET) for _ in range(ID_BODY_LENGTH))


def has_prefix(ident: str, prefix: Prefix) -> bool:
    """True when ``ident`` is shaped like an ID of this prefix (cheap check before a lookup)."""
    head, sep, body = ident.partition("_")
    return sep == "_" and head == prefix.value and 0 < len(body) <= 64 and all(c in ALPHABET for c in body)
