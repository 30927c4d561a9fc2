"""Bulkheads: caps on how many of one kind of long operation a key, a VM or the whole server has open at
once (execs, uploads, downloads, listings, terminals, SSH sessions). Pure bookkeeping, safe from any thread
and from the event loop (a lock held for a few dict operations, never across I/O).

A request takes a slot for every scope it belongs to (``("key", key_id)``, ``("vm", vm_id)``, ...) before it
starts and gives them back when it ends, however it ends; when any scope is full it takes none and the caller
answers 429 ``too_many_concurrent`` with ``Retry-After``. One tenant can then fill only its own slots."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from corral.domain.errors import RateLimited

Scope = tuple[str, str]  # (kind, ident): ("key", "key_x"), ("vm", "vm_x"), ("all", "")


class TooManyConcurrent(RateLimited):
    code = "too_many_concurrent"


@dataclass(frozen=True)
class Caps:
    """The cap of each scope kind for one kind of operation (a kind missing here is not capped)."""

    per: Mapping[str, int]
    retry_after: int = 1


class Bulkhead:
    """Slots of one kind of operation (``name``: "exec", "upload", ...), counted per scope."""

    def __init__(self, name: str, caps: Caps) -> None:
        self.name = name
        self.caps = caps
        self._held: dict[Scope, int] = {}
        self._lock = threading.Lock()

    def in_use(self, scope: Scope) -> int:
        with self._lock:
            return self._held.get(scope, 0)

    def try_acquire(self, scopes: Sequence[Scope]) -> Scope | None:
        """Take a slot in every scope and return None, or take none and return the first full scope."""
        with self._lock:
            for scope in scopes:
                cap = self.caps.per.get(scope[0])
                if cap is not None and self._held.get(scope, 0) >= cap:
                    return scope
            for scope in scopes:
                self._held[scope] = self._held.get(scope, 0) + 1
            return None

    def release(self, scopes: Sequence[Scope]) -> None:
        with self._lock:
            for scope in scopes:
                left = self._held.get(scope, 0) - 1
                if left > 0:
                    self._held[scope] = left
                else:
                    self._held.pop(scope, None)

    def acquire(self, scopes: Sequence[Scope]) -> None:
        """Take the slots or raise :class:`TooManyConcurrent` (429 with ``Retry-After``)."""
        full = self.try_acquire(scopes)
        if full is not None:
            cap = self.caps.per[full[0]]
            where = {
                "key": "this API key",
                "vm": "this VM",
                "user": "this account",
                "all": "the server",
                "source": "this address",
            }
            raise TooManyConcurrent(
                f"{where.get(full[0], full[0])} already has {cap} {self.name} operations running; "
                f"retry when one ends",
                retry_after=self.caps.retry_after,
            )

    @contextmanager
    def slot(self, scopes: Sequence[Scope]) -> Iterator[None]:
        self.acquire(scopes)
        try:
            yield
        finally:
            self.release(scopes)
