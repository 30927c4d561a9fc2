"""A VM's lifecycle as a transition table: every move is checked here, and a forbidden one raises a typed
error. ``status`` (stable, for clients) is derived from ``status_detail`` (the internal state)."""

from __future__ import annotations

from enum import StrEnum


class Detail(StrEnum):
    QUEUED = "queued"
    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"
    # memory and disk saved, CPU and memory freed (hibernate); resumed with its processes as they were
    HIBERNATING = "hibernating"
    HIBERNATED = "hibernated"
    RESUMING = "resuming"
    # back to a checkpoint, disk and memory
    ROLLING_BACK = "rolling_back"


class Status(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    STOPPED = "stopped"
    DESTROYED = "destroyed"
    FAILED = "failed"


STATUS_OF: dict[Detail, Status] = {
    Detail.QUEUED: Status.PENDING,
    Detail.CREATING: Status.PENDING,
    Detail.STARTING: Status.PENDING,
    Detail.RUNNING: Status.RUNNING,
    Detail.READY: Status.RUNNING,
    Detail.STOPPING: Status.STOPPED,
    Detail.STOPPED: Status.STOPPED,
    Detail.DESTROYING: Status.DESTROYED,
    Detail.DESTROYED: Status.DESTROYED,
    Detail.FAILED: Status.FAILED,
    Detail.HIBERNATING: Status.STOPPED,
    Detail.HIBERNATED: Status.STOPPED,
    Detail.RESUMING: Status.PENDING,
    Detail.ROLLING_BACK: Status.PENDING,
}

D = Detail
TRANSITIONS: dict[Detail, frozenset[Detail]] = {
    D.QUEUED: frozenset({D.CREATING, D.READY, D.FAILED}),  # ready at once: handed over from the warm pool
    D.CREATING: frozenset({D.STARTING, D.FAILED}),
    # back to stopped: a start interrupted by a server restart (reconciliation), the disk intact
    D.STARTING: frozenset({D.RUNNING, D.READY, D.STOPPED, D.FAILED}),
    D.RUNNING: frozenset({D.READY, D.STOPPING, D.FAILED}),
    D.READY: frozenset({D.STOPPING, D.HIBERNATING, D.ROLLING_BACK, D.FAILED}),
    # back to ready: the dump failed and the sandbox runs on (or a server restart found it running)
    D.HIBERNATING: frozenset({D.HIBERNATED, D.READY, D.FAILED}),
    D.HIBERNATED: frozenset({D.RESUMING, D.DESTROYING}),
    # back to hibernated: the restore failed, the saved state is intact
    D.RESUMING: frozenset({D.READY, D.HIBERNATED, D.FAILED}),
    D.ROLLING_BACK: frozenset({D.READY, D.FAILED}),
    D.STOPPING: frozenset({D.STOPPED, D.FAILED}),
    D.STOPPED: frozenset({D.STARTING, D.DESTROYING}),
    D.DESTROYING: frozenset({D.DESTROYED, D.FAILED}),
    D.DESTROYED: frozenset(),
    # a failed VM can be cleaned up: destroy removes what is left of it
    D.FAILED: frozenset({D.DESTROYING}),
}

# States in which the VM's sandbox may exist on the host (reconciliation keeps those resources).
ACTIVE = frozenset(
    {D.CREATING, D.STARTING, D.RUNNING, D.READY, D.STOPPING, D.HIBERNATING, D.RESUMING, D.ROLLING_BACK}
)
# States in which a process can be run in the VM.
EXECUTABLE = frozenset({D.RUNNING, D.READY})


class IllegalTransition(Exception):
    def __init__(self, current: Detail, target: Detail) -> None:
        super().__init__(f"a VM cannot go from {current} to {target}")
        self.current = current
        self.target = target


def status_of(detail: Detail) -> Status:
    return STATUS_OF[detail]


def can_move(current: Detail, target: Detail) -> bool:
    return target in TRANSITIONS[current]


def check_move(current: Detail, target: Detail) -> None:
    if not can_move(current, target):
        raise IllegalTransition(current, target)


def details_of(status: Status) -> frozenset[Detail]:
    return frozenset(d for d, s in STATUS_OF.items() if s is status)
