"""The proxy's audit queue: batches of at most ``batch``, drained on stop, re-queued in order when the store
fails, bounded (the oldest dropped and counted), and ``add`` never waits for the store."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

import pytest

from corral.egress.auditlog import AuditWriter
from corral.services.audit import NewEvent
from tests.support import wait_until

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def event(n: int) -> NewEvent:
    return NewEvent(
        user_id="usr_1",
        timestamp=T0,
        vm_id="vm_1",
        host=f"h{n}.example.org",
        cidr=None,
        protocol="tls",
        verdict="allowed",
        allowed=True,
        mode="enforce",
    )


def numbers(events: Sequence[NewEvent]) -> list[int]:
    return [int((e.host or "")[1:].split(".")[0]) for e in events]


class Store:
    """A writer that records every batch it stores. ``down``: every write fails (an empty one too, unless
    ``probe_reaches_store`` is False: then, like the writer ``corral egress`` uses, an empty batch never
    touches the store and succeeds); ``refused``: events the store refuses (a batch holding one fails);
    ``during``: runs once inside the next call (the proxy adding events while the store is slow)."""

    def __init__(self) -> None:
        self.calls: list[list[NewEvent]] = []
        self.attempts: list[list[int]] = []
        self.failures = 0
        self.down = False
        self.probe_reaches_store = True
        self.down_after: int | None = None  # goes down after this many attempts
        self.refused: set[int] = set()
        self.lock = threading.Lock()
        self.called = threading.Event()
        self.during: Callable[[], None] | None = None

    def __call__(self, events: Sequence[NewEvent]) -> None:
        with self.lock:
            self.attempts.append(numbers(events))
            if self.during is not None:
                during, self.during = self.during, None
                during()
            if self.down_after is not None and len(self.attempts) > self.down_after:
                self.down = True
            reaches = bool(events) or self.probe_reaches_store
            if self.down and reaches:
                self.failures += 1
                raise RuntimeError("the database is down")
            if self.refused.intersection(numbers(events)):
                self.failures += 1
                raise ValueError("the store refuses this event")
            if events:
                self.calls.append(list(events))
        self.called.set()

    @property
    def written(self) -> list[int]:
        with self.lock:
            return [n for call in self.calls for n in numbers(call)]


@pytest.fixture
def store() -> Store:
    return Store()


def refused_only(exc: Exception) -> bool:
    """What the store refuses as data (ValueError here), as opposed to the store being down."""
    return isinstance(exc, ValueError)


@pytest.fixture
def stopped() -> Iterator[list[AuditWriter]]:
    """Writers registered here are stopped after the test, whatever happened."""
    writers: list[AuditWriter] = []
    yield writers
    for w in writers:
        w.stop()


@pytest.mark.parametrize(
    ("count", "batch", "sizes"), [(7, 3, [3, 3, 1]), (6, 3, [3, 3]), (2, 5, [2]), (0, 3, [])]
)
def test_flush_writes_in_chunks_of_at_most_batch(
    store: Store, count: int, batch: int, sizes: list[int]
) -> None:
    writer = AuditWriter(store, is_bad_event=refused_only, batch=batch)
    for n in range(count):
        writer.add(event(n))
    assert writer.pending() == count
    writer.flush()
    assert [len(c) for c in store.calls] == sizes
    assert store.written == list(range(count))
    assert writer.pending() == 0
    assert writer.written == count
    assert writer.dropped == 0


def test_the_thread_writes_every_interval(store: Store, stopped: list[AuditWriter]) -> None:
    writer = AuditWriter(store, is_bad_event=refused_only, interval=0.02, batch=100)
    stopped.append(writer)
    writer.start()
    writer.add(event(1))
    writer.add(event(2))
    wait_until(lambda: store.written == [1, 2])
    assert writer.pending() == 0


def test_a_full_batch_is_written_without_waiting_for_the_interval(
    store: Store, stopped: list[AuditWriter]
) -> None:
    writer = AuditWriter(store, is_bad_event=refused_only, interval=60, batch=3)
    stopped.append(writer)
    writer.start()
    for n in range(3):
        writer.add(event(n))
    assert store.called.wait(5), "a full batch waited for the interval"
    assert store.calls[0] == [event(0), event(1), event(2)]


def test_stop_flushes_what_is_queued(store: Store) -> None:
    writer = AuditWriter(store, is_bad_event=refused_only, interval=60, batch=4)
    writer.start()
    for n in range(10):
        writer.add(event(n))
    writer.stop()
    assert store.written == list(range(10))
    assert all(len(c) <= 4 for c in store.calls)
    assert writer.pending() == 0


def test_stop_without_start_still_flushes(store: Store) -> None:
    writer = AuditWriter(store, is_bad_event=refused_only)
    writer.add(event(1))
    writer.stop()
    assert store.written == [1]


def test_while_the_store_is_down_events_stay_queued_in_order(store: Store) -> None:
    writer = AuditWriter(store, is_bad_event=refused_only, batch=2)
    for n in range(5):
        writer.add(event(n))
    store.down = True
    writer.flush()  # the first chunk fails, and its first event alone: back to the front, give up
    assert store.calls == []
    assert store.attempts == [[0, 1], [0]]
    assert writer.pending() == 5
    assert (writer.written, writer.dropped) == (0, 0)
    writer.flush()
    assert writer.pending() == 5
    store.down = False
    writer.add(event(5))
    writer.flush()
    assert store.written == [0, 1, 2, 3, 4, 5]
    assert (writer.written, writer.dropped) == (6, 0)


def test_the_store_going_down_after_a_good_batch_keeps_the_rest_in_order(store: Store) -> None:
    writer = AuditWriter(store, is_bad_event=refused_only, batch=2)
    for n in range(6):
        writer.add(event(n))
    store.down_after = 1
    writer.flush()
    assert store.written == [0, 1]
    assert writer.pending() == 4
    store.down_after, store.down = None, False
    writer.flush()
    assert store.written == [0, 1, 2, 3, 4, 5]
    assert writer.dropped == 0


@pytest.mark.parametrize("bad", [0, 2, 3])
def test_an_event_the_store_refuses_is_dropped_alone(store: Store, bad: int) -> None:
    writer = AuditWriter(store, is_bad_event=refused_only, batch=4)
    for n in range(6):
        writer.add(event(n))
    store.refused = {bad}
    writer.flush()
    assert store.written == [n for n in range(6) if n != bad]
    assert writer.dropped == 1
    assert writer.written == 5
    assert writer.pending() == 0


def test_the_thread_retries_after_the_store_comes_back(store: Store, stopped: list[AuditWriter]) -> None:
    store.down = True
    writer = AuditWriter(store, is_bad_event=refused_only, interval=0.02, batch=10)
    stopped.append(writer)
    writer.start()
    for n in range(3):
        writer.add(event(n))
    wait_until(lambda: store.failures >= 6)  # two rounds at least
    assert store.written == []
    store.down = False
    wait_until(lambda: store.written == [0, 1, 2])
    assert writer.dropped == 0


def test_a_store_outage_loses_nothing_when_an_empty_write_does_not_reach_the_store(store: Store) -> None:
    store.probe_reaches_store = False
    writer = AuditWriter(store, is_bad_event=refused_only, batch=10)
    for n in range(5):
        writer.add(event(n))
    store.down = True
    writer.flush()
    store.down = False
    writer.flush()
    assert writer.dropped == 0
    assert store.written == [0, 1, 2, 3, 4]


def test_the_store_going_down_during_the_one_by_one_retry_loses_nothing(store: Store) -> None:
    writer = AuditWriter(store, is_bad_event=refused_only, batch=10)
    for n in range(5):
        writer.add(event(n))
    store.refused = {1}  # the batch fails for this one event
    store.down_after = 2  # the batch and event 0 alone go through the store; then it is down
    writer.flush()
    store.down_after, store.down = None, False
    writer.flush()
    assert writer.dropped == 1  # event 1, which the store refuses
    assert store.written == [0, 2, 3, 4]


def test_max_pending_drops_the_oldest_and_counts_them(store: Store) -> None:
    writer = AuditWriter(store, is_bad_event=refused_only, batch=100, max_pending=3)
    for n in range(5):
        writer.add(event(n))
    assert writer.pending() == 3
    assert writer.dropped == 2
    writer.flush()
    assert store.written == [2, 3, 4]


def test_requeue_into_a_full_queue_drops_the_oldest_and_counts_them(store: Store) -> None:
    writer = AuditWriter(store, is_bad_event=refused_only, batch=2, max_pending=4)
    for n in range(3):
        writer.add(event(n))

    def proxy_keeps_adding() -> None:  # while the store is slow and then fails, the proxy adds 3 more
        for n in range(3, 6):
            writer.add(event(n))

    store.during = proxy_keeps_adding
    store.down = True
    writer.flush()  # chunk [0, 1] fails; [2, 3, 4, 5] are queued: two of the six must go
    store.down = False
    assert writer.pending() == 4
    writer.flush()
    assert writer.dropped + len(store.written) == 6  # every event is written or counted as dropped
    assert store.written == [2, 3, 4, 5]  # and the ones dropped are the oldest


def test_add_never_waits_for_a_slow_writer(stopped: list[AuditWriter]) -> None:
    started, release = threading.Event(), threading.Event()
    written: list[NewEvent] = []

    def slow(events: Sequence[NewEvent]) -> None:
        started.set()
        release.wait(10)
        written.extend(events)

    writer = AuditWriter(slow, interval=0.01, batch=1)
    stopped.append(writer)
    writer.start()
    try:
        writer.add(event(0))
        assert started.wait(5)  # the writer thread is stuck in the store now
        begin = time.monotonic()
        for n in range(1, 1001):
            writer.add(event(n))
        assert time.monotonic() - begin < 0.5
        assert writer.pending() == 1000
    finally:
        release.set()
    wait_until(lambda: len(written) == 1001)
    assert numbers(written) == list(range(1001))
