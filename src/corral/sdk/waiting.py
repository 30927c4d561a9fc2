"""Whether a VM or snapshot being waited for is there yet (pure), and the errors when it will never be."""

from __future__ import annotations

from corral.sdk.errors import CorralError
from corral.sdk.models import Snapshot, Vm

POLL_INTERVAL = 0.1  # seconds between two looks, at first
MAX_POLL_INTERVAL = 1.0
DEFAULT_WAIT = 300.0


class WaitError(CorralError):
    """What was waited for will not come: the VM failed, stopped or was destroyed, the snapshot failed, or
    the time ran out (``code`` says which)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(None, code, message)


def vm_ready(vm: Vm) -> bool:
    """True once the VM is ``ready`` (its command server answers); raises if it never will be."""
    if vm.status_detail == "ready":
        return True
    if vm.status == "failed":
        raise WaitError("vm_failed", f"VM {vm.id} failed: {vm.failure_reason or 'no reason given'}")
    if vm.status in ("stopped", "destroyed"):
        raise WaitError("vm_not_running", f"VM {vm.id} is {vm.status_detail}, not starting")
    return False


def snapshot_ready(snap: Snapshot) -> bool:
    """True once the snapshot is ``ready``; raises if it failed."""
    if snap.status == "ready":
        return True
    if snap.status == "failed":
        raise WaitError("snapshot_failed", f"snapshot {snap.id} failed: {snap.failure_reason or 'no reason'}")
    return False


def next_interval(interval: float) -> float:
    return min(interval * 1.5, MAX_POLL_INTERVAL)


def timed_out(what: str, timeout: float) -> WaitError:
    return WaitError("wait_timeout", f"{what} was not ready after {timeout:g} s")
