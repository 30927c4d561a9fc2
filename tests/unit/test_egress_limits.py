"""The egress process's pure bookkeeping: connection caps by VM, owner and node; the descriptor limit they
need; the log throttle."""

from __future__ import annotations

from corral.egress.limits import FD_RESERVE, Caps, Counts, Throttle, held_note


def test_caps_refuse_by_vm_then_owner_then_node_and_release_frees() -> None:
    counts = Counts(Caps(per_vm=2, per_owner=3, total=4))
    assert counts.admit("vm_a", "usr_1") is None
    assert counts.admit("vm_a", "usr_1") is None
    assert counts.admit("vm_a", "usr_1") == "vm"
    assert counts.admit("vm_b", "usr_1") is None
    assert counts.admit("vm_b", "usr_1") == "owner"
    assert counts.admit("vm_c", "usr_2") is None
    assert counts.admit("vm_d", "usr_3") == "total"
    assert (counts.by_vm, counts.by_owner, counts.total) == (
        {"vm_a": 2, "vm_b": 1, "vm_c": 1},
        {"usr_1": 3, "usr_2": 1},
        4,
    )
    counts.release("vm_a", "usr_1")
    counts.release("vm_c", "usr_2")
    assert counts.admit("vm_d", "usr_3") is None
    assert counts.admit("vm_b", "usr_1") is None
    assert counts.by_vm == {"vm_a": 1, "vm_b": 2, "vm_d": 1}
    assert "vm_c" not in counts.by_vm
    assert "usr_2" not in counts.by_owner


def test_release_never_goes_negative() -> None:
    counts = Counts(Caps())
    counts.release("vm_a", "usr_1")
    assert (counts.by_vm, counts.by_owner, counts.total) == ({}, {}, 0)


def test_the_descriptor_limit_covers_two_per_connection_at_the_node_cap() -> None:
    assert Caps(total=1000).fd_limit() == 2000 + FD_RESERVE


def test_throttle_reports_once_per_interval_with_the_count_held_back() -> None:
    now = [0.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    assert throttle.due("emfile") == 0
    assert [throttle.due("emfile") for _ in range(500)] == [None] * 500
    assert throttle.due("other") == 0  # keys are apart
    now[0] = 9.9
    assert throttle.due("emfile") is None
    now[0] = 10.0
    assert throttle.due("emfile") == 501
    now[0] = 25.0
    assert throttle.due("emfile") == 0
    assert held_note(0) == ""
    assert "501" in held_note(501)


def test_caps_shrink_to_the_descriptors_the_process_may_have() -> None:
    wanted = Caps(per_vm=1024, per_owner=4096, total=16384)
    assert wanted.within(wanted.fd_limit()) == wanted
    assert wanted.within(20000) == Caps(per_vm=1024, per_owner=4096, total=(20000 - FD_RESERVE) // 2)
    assert wanted.within(6000) == Caps(per_vm=952, per_owner=952, total=952)
    assert wanted.within(100).total == 1
