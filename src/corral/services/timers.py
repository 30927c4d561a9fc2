"""One background thread for everything that happens at a time: auto-destroy deadlines and the periodic
usage sample. It sleeps until the earliest of the next deadline (read from the store, so deadlines survive
restarts) and the next sample, and is woken early when a deadline is set or moved."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

from corral.domain.clock import Clock

log = logging.getLogger("corral.timers")

RETRY_S = 1.0  # a VM in the middle of an operation when its time came is tried again this much later
MAX_SLEEP_S = 300.0  # wakes at least this often (a clock step, a deadline written by another server)


def next_wake(now: datetime, deadline: datetime | None, next_sample_in: float, *, retry: bool) -> float:
    """Seconds to sleep: until the deadline, the next sample, or the retry, whichever comes first."""
    wait = min(next_sample_in, MAX_SLEEP_S)
    if deadline is not None:
        until = (deadline - now).total_seconds()
        # a deadline already past is one that could not be met yet: tried again after a pause
        wait = min(wait, until if until > 0 else RETRY_S)
    if retry:
        wait = min(wait, RETRY_S)
    return max(0.0, wait)


class Timers:
    def __init__(
        self,
        clock: Clock,
        *,
        expire_due: Callable[[], bool],
        next_deadline: Callable[[], datetime | None],
        sample: Callable[[], None],
        sample_interval_s: float,
    ) -> None:
        """``expire_due`` ends every VM whose time has come (True when some must be tried again);
        ``next_deadline`` is the earliest deadline still ahead; ``sample`` samples every running VM."""
        self.clock = clock
        self._expire_due = expire_due
        self._next_deadline = next_deadline
        self._sample = sample
        self.interval = sample_interval_s
        self._wake = threading.Condition()
        self._poked = False
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="corral-timers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """A deadline was set or moved: look again now."""
        with self._wake:
            self._poked = True
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        next_sample = self.clock.monotonic() + self.interval
        while True:
            retry = False
            try:
                retry = self._expire_due()
                if self.clock.monotonic() >= next_sample:
                    next_sample = self.clock.monotonic() + self.interval
                    self._sample()
                deadline = self._next_deadline()
            except Exception:
                log.exception("a timer round failed; trying again shortly")
                deadline, retry = None, True
            wait = next_wake(self.clock.now(), deadline, next_sample - self.clock.monotonic(), retry=retry)
            with self._wake:
                if not self._poked and not self._stopping:
                    self._wake.wait(wait)
                self._poked = False
                if self._stopping:
                    return
