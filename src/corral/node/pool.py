"""A warm pool: sandboxes booted ahead of time from one image with the default resources, so that creating
a VM is a hand-over instead of a boot. Refilled in the background after every hand-over."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from corral.domain.capacity import Amounts

log = logging.getLogger("corral.pool")

POOL_PREFIX = "wp-"


@dataclass(frozen=True)
class PoolKey:
    image: str
    vcpus: int
    mem_mib: int
    disk_mib: int


class WarmPool:
    def __init__(
        self,
        key: PoolKey,
        size: int,
        boot: Callable[[str], None],
        discard: Callable[[str], None],
        new_cid: Callable[[], str] = lambda: POOL_PREFIX + secrets.token_hex(6),
    ) -> None:
        self.key = key
        self.size = size
        self._boot = boot  # boots a sandbox with this container id (raises on failure)
        self._discard = discard  # destroys one
        self._new_cid = new_cid  # the container id (and hostname) of the next sandbox
        self._ready: deque[str] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.failures = 0
        self.refill_delay = 0.1
        # whether the node has room for one more sandbox (None: always); asked before each boot
        self.room: Callable[[], bool] | None = None

    def start(self) -> None:
        if self.size < 1 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._refill_loop, name="corral-warm-pool", daemon=True)
        self._thread.start()
        self._wake.set()

    def take(self, key: PoolKey) -> str | None:
        """A booted sandbox's container id for a VM with ``key``, or None (then boot one cold)."""
        if key != self.key:
            return None
        with self._lock:
            cid = self._ready.popleft() if self._ready else None
        self._wake.set()
        return cid

    def give_back(self, cid: str) -> None:
        """Return an unused sandbox taken with ``take`` (the create that took it failed)."""
        with self._lock:
            if not self._closed:
                self._ready.appendleft(cid)
                return
        self._discard(cid)

    def ready_count(self) -> int:
        with self._lock:
            return len(self._ready)

    def reserved(self, count: int | None = None) -> Amounts:
        """What ``count`` sandboxes of this pool hold (default: those waiting now); ``vms`` stays 0, they are
        no account's VMs."""
        k = self.key
        return Amounts(0, k.vcpus, k.mem_mib, k.disk_mib).times(
            self.ready_count() if count is None else count
        )

    def _refill_loop(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=5.0)
            self._wake.clear()
            # let the VM just handed over come up and its first requests run before booting (a boot takes
            # both cores for a few tens of ms)
            time.sleep(self.refill_delay)
            while not self._closed and self.ready_count() < self.size:
                if not self._has_room():
                    break  # the node is full: wait for the next hand-over (or 5 s) and ask again
                cid = self._new_cid()
                try:
                    self._boot(cid)
                except Exception:
                    self.failures += 1
                    log.exception("warm pool: booting a sandbox failed")
                    self._wake.wait(timeout=min(30.0, 2.0**self.failures))
                    break
                self.failures = 0
                with self._lock:
                    if self._closed:
                        self._discard(cid)
                        return
                    self._ready.append(cid)

    def _has_room(self) -> bool:
        if self.room is None:
            return True
        try:
            return self.room()
        except Exception:
            log.exception("warm pool: the node's room could not be read")
            return False

    def close(self) -> None:
        """Stop refilling and destroy the sandboxes still waiting."""
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            left = list(self._ready)
            self._ready.clear()
        for cid in left:
            try:
                self._discard(cid)
            except Exception:
                log.exception("warm pool: removing %s failed", cid)
