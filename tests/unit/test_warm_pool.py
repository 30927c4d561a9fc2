"""The warm pool, with fake boot and discard functions that record what they were asked to do."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from corral.node.pool import POOL_PREFIX, PoolKey, WarmPool

KEY = PoolKey(image="debian:bookworm", vcpus=1, mem_mib=1024, disk_mib=4096)
DEADLINE = 30.0  # generous: the host may be heavily loaded


class Fakes:
    """Boot and discard as lists; ``fail_next`` makes that many boots raise."""

    def __init__(self) -> None:
        self.booted: list[str] = []
        self.attempts: list[str] = []
        self.discarded: list[str] = []
        self.fail_next = 0
        self._ids = itertools.count(1)
        self.lock = threading.Lock()

    def new_cid(self) -> str:
        return f"wp-{next(self._ids)}"

    def boot(self, cid: str) -> None:
        with self.lock:
            self.attempts.append(cid)
            if self.fail_next:
                self.fail_next -= 1
                raise RuntimeError("boot failed")
            self.booted.append(cid)

    def discard(self, cid: str) -> None:
        self.discarded.append(cid)


def wait_for(check: Callable[[], bool], deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            pytest.fail("condition not reached before the deadline")
        time.sleep(0.01)


@pytest.fixture
def fakes() -> Fakes:
    return Fakes()


@pytest.fixture
def make_pool(fakes: Fakes) -> Iterator[Callable[[int], WarmPool]]:
    pools: list[WarmPool] = []

    def make(size: int) -> WarmPool:
        pool = WarmPool(KEY, size, fakes.boot, fakes.discard, new_cid=fakes.new_cid)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def test_start_fills_the_pool_in_the_background(fakes: Fakes, make_pool: Callable[[int], WarmPool]) -> None:
    pool = make_pool(3)
    assert pool.ready_count() == 0
    pool.start()
    wait_for(lambda: pool.ready_count() == 3)
    time.sleep(0.1)
    assert pool.ready_count() == 3  # and no more
    assert fakes.booted == ["wp-1", "wp-2", "wp-3"]
    assert fakes.discarded == []
    assert pool.failures == 0


def test_start_twice_makes_one_thread(fakes: Fakes, make_pool: Callable[[int], WarmPool]) -> None:
    pool = make_pool(2)
    pool.start()
    first = pool._thread
    pool.start()
    assert pool._thread is first
    wait_for(lambda: pool.ready_count() == 2)
    time.sleep(0.1)
    assert len(fakes.booted) == 2


def test_take_hands_over_a_booted_sandbox_and_refills(
    fakes: Fakes, make_pool: Callable[[int], WarmPool]
) -> None:
    pool = make_pool(2)
    pool.start()
    wait_for(lambda: pool.ready_count() == 2)
    cid = pool.take(PoolKey("debian:bookworm", 1, 1024, 4096))
    assert cid == "wp-1"  # the oldest first
    assert cid in fakes.booted
    wait_for(lambda: len(fakes.booted) == 3 and pool.ready_count() == 2)
    assert pool.take(KEY) == "wp-2"
    assert pool.take(KEY) == "wp-3"
    wait_for(lambda: pool.ready_count() == 2)
    assert fakes.booted == ["wp-1", "wp-2", "wp-3", "wp-4", "wp-5"]
    assert fakes.discarded == []


@pytest.mark.parametrize(
    "other",
    [
        PoolKey("debian:trixie", 1, 1024, 4096),
        PoolKey("debian:bookworm", 2, 1024, 4096),
        PoolKey("debian:bookworm", 1, 2048, 4096),
        PoolKey("debian:bookworm", 1, 1024, 8192),
    ],
)
def test_a_different_key_gets_nothing(
    fakes: Fakes, make_pool: Callable[[int], WarmPool], other: PoolKey
) -> None:
    pool = make_pool(1)
    pool.start()
    wait_for(lambda: pool.ready_count() == 1)
    assert pool.take(other) is None
    assert pool.ready_count() == 1
    assert pool.take(KEY) == "wp-1"


def test_an_empty_pool_gives_none(make_pool: Callable[[int], WarmPool]) -> None:
    pool = make_pool(1)  # never started
    assert pool.take(KEY) is None


def test_give_back_puts_it_at_the_front(fakes: Fakes, make_pool: Callable[[int], WarmPool]) -> None:
    pool = make_pool(2)
    pool.start()
    wait_for(lambda: pool.ready_count() == 2)
    taken = pool.take(KEY)
    assert taken == "wp-1"
    wait_for(lambda: pool.ready_count() == 2)  # refilled with wp-3
    pool.give_back(taken)
    assert pool.ready_count() == 3
    assert pool.take(KEY) == "wp-1"
    assert pool.take(KEY) == "wp-2"
    assert fakes.discarded == []


def test_close_discards_the_waiting_ones_and_stops(
    fakes: Fakes, make_pool: Callable[[int], WarmPool]
) -> None:
    pool = make_pool(3)
    pool.start()
    wait_for(lambda: pool.ready_count() == 3)
    taken = pool.take(KEY)
    wait_for(lambda: pool.ready_count() == 3)
    thread = pool._thread
    assert thread is not None
    pool.close()
    assert not thread.is_alive()
    assert sorted(fakes.discarded) == ["wp-2", "wp-3", "wp-4"]
    assert taken not in fakes.discarded  # in use: not the pool's any more
    assert pool.ready_count() == 0
    booted = len(fakes.booted)
    time.sleep(0.1)
    assert len(fakes.booted) == booted  # no refill after close
    assert pool.take(KEY) is None


def test_give_back_after_close_discards(fakes: Fakes, make_pool: Callable[[int], WarmPool]) -> None:
    pool = make_pool(1)
    pool.start()
    wait_for(lambda: pool.ready_count() == 1)
    taken = pool.take(KEY)
    assert taken is not None
    pool.close()
    pool.give_back(taken)
    assert taken in fakes.discarded
    assert pool.ready_count() == 0


def test_a_failed_boot_is_counted_and_retried_later(
    fakes: Fakes, make_pool: Callable[[int], WarmPool]
) -> None:
    fakes.fail_next = 1
    pool = make_pool(1)
    pool.start()
    wait_for(lambda: pool.failures == 1)
    time.sleep(0.3)
    assert fakes.attempts == ["wp-1"]  # backing off, not retrying at once
    assert pool.ready_count() == 0
    assert pool.take(KEY) is None  # a hand-over attempt wakes the pool
    wait_for(lambda: pool.ready_count() == 1)
    assert fakes.attempts == ["wp-1", "wp-2"]
    assert fakes.booted == ["wp-2"]
    assert pool.failures == 0  # reset by the success
    assert fakes.discarded == []  # the failed one was never handed to the pool


def test_repeated_failures_accumulate(fakes: Fakes, make_pool: Callable[[int], WarmPool]) -> None:
    fakes.fail_next = 3
    pool = make_pool(1)
    pool.start()
    for n in (1, 2, 3):

        def failed(want: int = n) -> bool:
            return pool.failures == want

        wait_for(failed)
        pool.take(KEY)  # wake it instead of waiting out the backoff
    wait_for(lambda: pool.ready_count() == 1)
    assert len(fakes.attempts) == 4
    assert pool.failures == 0


def test_size_zero_never_starts(fakes: Fakes, make_pool: Callable[[int], WarmPool]) -> None:
    pool = make_pool(0)
    pool.start()
    assert pool._thread is None
    time.sleep(0.1)
    assert fakes.attempts == []
    assert pool.take(KEY) is None
    pool.close()
    assert fakes.discarded == []


def test_default_ids_are_pool_prefixed() -> None:
    booted: list[str] = []
    pool = WarmPool(KEY, 2, booted.append, lambda cid: None)
    pool.start()
    try:
        wait_for(lambda: pool.ready_count() == 2)
    finally:
        pool.close()
    assert len(set(booted)) == 2
    assert all(cid.startswith(POOL_PREFIX) and len(cid) == len(POOL_PREFIX) + 12 for cid in booted)


def test_refill_boots_only_while_the_node_has_room(
    fakes: Fakes, make_pool: Callable[[int], WarmPool]
) -> None:
    pool = make_pool(3)
    room = threading.Event()
    room.set()
    pool.room = lambda: room.is_set() and pool.ready_count() < 1  # the node holds one more sandbox
    pool.start()
    wait_for(lambda: pool.ready_count() == 1)
    time.sleep(0.2)
    assert fakes.attempts == ["wp-1"]  # no boot without room, and no failure counted
    assert pool.failures == 0
    assert pool.reserved().mem_mib == 1024
    assert pool.reserved().disk_mib == 4096
    assert pool.reserved(2).vcpus == 2
    pool.room = lambda: True  # room again (a VM was destroyed): the next wake-up fills the pool
    assert pool.take(KEY) == "wp-1"
    wait_for(lambda: pool.ready_count() == 3)
