"""What the services need from the outside world, passed in so tests can replace each piece."""

from __future__ import annotations

from dataclasses import dataclass

from corral.domain.clock import Clock
from corral.security.secretbox import Cipher


@dataclass(frozen=True)
class Services:
    clock: Clock
    cipher: Cipher
    device_code_ttl_seconds: int = 900
