"""Pure bookkeeping of the egress process's shared resources: how many connections each sandbox, each owner
and the node hold open (counted from accept, so a connection that never sends a byte counts too), the
descriptor limit those caps need, and a throttle that turns a flood of identical log lines into one line per
interval with a count."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

# descriptors beyond two per connection: the resolver, upstream DNS queries, the store, log and CA files
FD_RESERVE = 4096


@dataclass(frozen=True)
class Caps:
    """Open connections allowed at once: per sandbox (VM), per owner (account) and in all."""

    per_vm: int = 1024
    per_owner: int = 4096
    total: int = 16384

    def fd_limit(self) -> int:
        """The descriptors the proxy needs when every cap is reached: two per connection (the sandbox's and
        the upstream one) plus a reserve, so ``accept`` never meets EMFILE before a cap refuses."""
        return 2 * self.total + FD_RESERVE

    def within(self, fd_limit: int) -> Caps:
        """These caps, the node's lowered to what ``fd_limit`` descriptors hold (when the limit cannot be
        raised that far: without CAP_SYS_RESOURCE the hard limit stays), and no per-owner or per-VM cap
        above the node's."""
        total = min(self.total, max(1, (fd_limit - FD_RESERVE) // 2))
        per_owner = min(self.per_owner, total)
        return Caps(per_vm=min(self.per_vm, per_owner), per_owner=per_owner, total=total)


@dataclass
class Counts:
    """Open connections by VM and by owner, checked against ``caps`` when one is accepted."""

    caps: Caps
    by_vm: dict[str, int] = field(default_factory=dict)
    by_owner: dict[str, int] = field(default_factory=dict)
    total: int = 0

    def admit(self, vm_id: str, owner: str) -> str | None:
        """Count one more connection of ``vm_id`` (owned by ``owner``), or say which cap refuses it:
        ``"vm"``, ``"owner"`` or ``"total"`` (nothing is counted then)."""
        if self.total >= self.caps.total:
            return "total"
        if self.by_owner.get(owner, 0) >= self.caps.per_owner:
            return "owner"
        if self.by_vm.get(vm_id, 0) >= self.caps.per_vm:
            return "vm"
        self.by_vm[vm_id] = self.by_vm.get(vm_id, 0) + 1
        self.by_owner[owner] = self.by_owner.get(owner, 0) + 1
        self.total += 1
        return None

    def release(self, vm_id: str, owner: str) -> None:
        """One admitted connection of ``vm_id`` closed."""
        _decrement(self.by_vm, vm_id)
        _decrement(self.by_owner, owner)
        self.total = max(0, self.total - 1)


def _decrement(table: dict[str, int], key: str) -> None:
    left = table.get(key, 0) - 1
    if left > 0:
        table[key] = left
    else:
        table.pop(key, None)


class Throttle:
    """At most one report per key every ``interval`` seconds. ``due(key)`` answers None while the key is
    quiet, else how many reports were held back since the last one (the caller logs once, with that count)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000):
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def due(self, key: Hashable = None) -> int | None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if len(self._last) >= self._max_keys and key not in self._last:
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        return self._held.pop(key, 0)


def held_note(held: int) -> str:
    """The suffix of a throttled log line."""
    return f" ({held} more like this since the last report)" if held else ""
