from __future__ import annotations

import threading

import pytest

from corral.domain.bulkhead import Bulkhead, Caps, TooManyConcurrent


def test_a_full_scope_takes_no_slot_anywhere() -> None:
    b = Bulkhead("exec", Caps({"key": 2, "vm": 1}))
    assert b.try_acquire([("key", "k"), ("vm", "a")]) is None
    assert b.try_acquire([("key", "k"), ("vm", "a")]) == ("vm", "a")
    assert b.in_use(("key", "k")) == 1  # the refused request took nothing
    assert b.try_acquire([("key", "k"), ("vm", "b")]) is None
    assert b.try_acquire([("key", "k"), ("vm", "c")]) == ("key", "k")
    assert b.try_acquire([("key", "other"), ("vm", "c")]) is None  # another key is not affected


def test_release_frees_and_forgets() -> None:
    b = Bulkhead("upload", Caps({"key": 1}))
    b.acquire([("key", "k")])
    with pytest.raises(TooManyConcurrent) as exc:
        b.acquire([("key", "k")])
    assert exc.value.status == 429
    assert exc.value.code == "too_many_concurrent"
    assert exc.value.retry_after == 1
    assert "this API key" in exc.value.message
    b.release([("key", "k")])
    assert b.in_use(("key", "k")) == 0
    assert not b._held
    with b.slot([("key", "k")]):
        assert b.in_use(("key", "k")) == 1
    assert b.in_use(("key", "k")) == 0


def test_slot_is_given_back_when_the_body_raises() -> None:
    b = Bulkhead("listing", Caps({"vm": 1}))
    with pytest.raises(ValueError, match="boom"), b.slot([("vm", "v")]):
        raise ValueError("boom")
    assert b.in_use(("vm", "v")) == 0


def test_uncapped_kinds_are_counted_but_never_full() -> None:
    b = Bulkhead("exec", Caps({"key": 1}))
    for _ in range(100):
        assert b.try_acquire([("vm", "v")]) is None
    assert b.in_use(("vm", "v")) == 100


def test_threads_never_exceed_the_cap() -> None:
    b = Bulkhead("exec", Caps({"key": 5}))
    peak = 0
    lock = threading.Lock()
    inside = 0

    def work() -> None:
        nonlocal peak, inside
        for _ in range(200):
            if b.try_acquire([("key", "k")]) is None:
                with lock:
                    inside += 1
                    peak = max(peak, inside)
                with lock:
                    inside -= 1
                b.release([("key", "k")])

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak <= 5
    assert b.in_use(("key", "k")) == 0
