"""A VM's lifecycle: the status each internal state shows, and the moves the transition table allows."""

from __future__ import annotations

from collections import deque

import pytest

from corral.domain.vm_states import (
    ACTIVE,
    EXECUTABLE,
    STATUS_OF,
    TRANSITIONS,
    Detail,
    IllegalTransition,
    Status,
    can_move,
    check_move,
    details_of,
    status_of,
)

D = Detail

# The iron.sh reference's "VM Status" table, verbatim, with the details sandbox state adds (hibernate and
# resume from isorun: `stopped`/`hibernated`; rollback from the instances platform)
_REFERENCE = {
    "pending": ("queued", "creating", "starting", "resuming", "rolling_back"),
    "running": ("running", "ready"),
    "stopped": ("stopping", "stopped", "hibernating", "hibernated"),
    "destroyed": ("destroying", "destroyed"),
    "failed": ("failed",),
}


def _reachable(start: Detail) -> set[Detail]:
    seen = {start}
    todo = deque([start])
    while todo:
        for nxt in TRANSITIONS[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# --- status ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("detail", "status"), [(d, s) for s, details in _REFERENCE.items() for d in details])
def test_status_follows_the_reference(detail: str, status: str) -> None:
    assert status_of(Detail(detail)) is Status(status)
    assert STATUS_OF[Detail(detail)].value == status


def test_reference_covers_every_detail_and_status() -> None:
    assert {d for details in _REFERENCE.values() for d in details} == {d.value for d in Detail}
    assert set(_REFERENCE) == {s.value for s in Status}
    assert set(STATUS_OF) == set(Detail)


@pytest.mark.parametrize("status", list(Status))
def test_details_of_inverts_status_of(status: Status) -> None:
    details = details_of(status)
    assert details == {d for d, s in STATUS_OF.items() if s is status}
    assert {d.value for d in details} == set(_REFERENCE[status.value])
    assert all(status_of(d) is status for d in details)


def test_details_of_partitions_the_details() -> None:
    parts = [details_of(s) for s in Status]
    assert sum(len(p) for p in parts) == len(Detail)
    assert frozenset().union(*parts) == frozenset(Detail)


# --- transitions ----------------------------------------------------------------------------------------


def test_table_has_a_row_for_every_detail_and_names_only_details() -> None:
    assert set(TRANSITIONS) == set(Detail)
    for current, targets in TRANSITIONS.items():
        assert targets <= set(Detail)
        assert current not in targets, f"{current} moves to itself"


def test_destroyed_is_terminal() -> None:
    assert TRANSITIONS[D.DESTROYED] == frozenset()
    for target in Detail:
        assert not can_move(D.DESTROYED, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (D.STOPPED, D.DESTROYING),
        (D.FAILED, D.DESTROYING),
        (D.QUEUED, D.READY),  # handed over from the warm pool
        (D.QUEUED, D.CREATING),
        (D.CREATING, D.STARTING),
        (D.STARTING, D.RUNNING),
        (D.RUNNING, D.STOPPING),
        (D.STOPPING, D.STOPPED),
        (D.STOPPED, D.STARTING),
        (D.DESTROYING, D.DESTROYED),
    ],
)
def test_allowed_moves(current: Detail, target: Detail) -> None:
    assert can_move(current, target)
    check_move(current, target)  # does not raise


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (D.RUNNING, D.DESTROYING),  # must stop first
        (D.READY, D.DESTROYING),
        (D.QUEUED, D.DESTROYING),
        (D.DESTROYED, D.QUEUED),
        (D.DESTROYED, D.DESTROYING),
        (D.FAILED, D.RUNNING),
        (D.STOPPED, D.RUNNING),  # through starting
        (D.QUEUED, D.RUNNING),
    ],
)
def test_forbidden_moves_raise_with_both_states(current: Detail, target: Detail) -> None:
    assert not can_move(current, target)
    with pytest.raises(IllegalTransition) as info:
        check_move(current, target)
    assert info.value.current is current
    assert info.value.target is target
    assert str(current) in str(info.value)
    assert str(target) in str(info.value)


def test_every_state_is_reachable_from_queued() -> None:
    assert _reachable(D.QUEUED) == set(Detail)


def test_destroyed_is_reachable_from_every_other_state() -> None:
    cannot = [d for d in Detail if d is not D.DESTROYED and D.DESTROYED not in _reachable(d)]
    assert cannot == []
    assert _reachable(D.DESTROYED) == {D.DESTROYED}


def test_active_and_executable_sets() -> None:
    assert details_of(Status.RUNNING) == EXECUTABLE
    assert EXECUTABLE <= ACTIVE
    assert D.DESTROYED not in ACTIVE
