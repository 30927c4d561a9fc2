"""Audit events from the proxy to the store in batches: the proxy only appends to a queue; a thread writes
what has gathered every ``interval`` seconds (or sooner when a batch is full) in one statement.

Nothing is lost while the store is down: a failed batch is written again event by event, an event the store
refuses as such (``is_bad_event``: bad data, not a connection failure) is dropped and logged, and at the
first failure of any other kind the rest goes back to the queue for the next round. Only a queue that
outgrows ``max_pending`` (the store down for long) drops events, the oldest first, counted in ``dropped``
and logged. A clean stop drains the queue."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Sequence

from corral.services.audit import NewEvent

log = logging.getLogger(__name__)


def _never(_exc: Exception) -> bool:
    return False


class AuditWriter:
    def __init__(
        self,
        write: Callable[[Sequence[NewEvent]], None],
        *,
        is_bad_event: Callable[[Exception], bool] = _never,
        interval: float = 0.2,
        batch: int = 500,
        max_pending: int = 100_000,
    ) -> None:
        self._write = write
        self._is_bad_event = is_bad_event
        self._interval = interval
        self._batch = batch
        self._max = max_pending
        self._pending: collections.deque[NewEvent] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.dropped = 0
        self.written = 0
        self._thread = threading.Thread(target=self._loop, name="egress-audit", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, event: NewEvent) -> None:
        with self._lock:
            self._pending.append(event)
            self._trim()
            full = len(self._pending) >= self._batch
        if full:
            self._wake.set()

    def _trim(self) -> None:
        """Drop the oldest events beyond ``max_pending`` (with the lock held)."""
        over = len(self._pending) - self._max
        if over <= 0:
            return
        for _ in range(over):
            self._pending.popleft()
        before = self.dropped
        self.dropped += over
        if before == 0 or before // 1000 != self.dropped // 1000:
            log.error(
                "the audit queue is full (the store is not taking events): %d dropped so far", self.dropped
            )

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self) -> None:
        """Write everything queued now (also used by ``stop``); stops early when the store is down."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                chunk = [self._pending.popleft() for _ in range(min(self._batch, len(self._pending)))]
            try:
                self._write(chunk)
            except Exception:
                if not self._one_by_one(chunk):
                    return
                continue
            with self._lock:
                self.written += len(chunk)

    def _one_by_one(self, chunk: list[NewEvent]) -> bool:
        """Write each event of a failed batch alone. False (the rest queued again, in order) at the first
        failure that is not about the event itself."""
        for i, event in enumerate(chunk):
            try:
                self._write([event])
            except Exception as exc:
                if self._is_bad_event(exc):
                    log.error("an audit event the store refuses is dropped: %r (%s)", event, exc)
                    with self._lock:
                        self.dropped += 1
                    continue
                log.warning("writing audit events failed (%s); %d queued again", exc, len(chunk) - i)
                with self._lock:
                    self._pending.extendleft(reversed(chunk[i:]))
                    self._trim()
                return False
            with self._lock:
                self.written += 1
        return True

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            self.flush()
