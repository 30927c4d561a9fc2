"""Freezing a sandbox's processes (the cgroup freezer) so its disk can be captured at the same instant as its
memory: nothing in the sandbox runs between the two. CRIU finds the cgroup already frozen, dumps, and leaves it
frozen; we thaw it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from corral.runtime.cgroups import CGROUP_ROOT, is_pure_v2


class FreezeError(RuntimeError):
    pass


def _v1_state(parent: str, name: str, root: Path) -> Path:
    return root / "freezer" / parent / name / "freezer.state"


def freeze_request(parent: str, name: str, *, root: Path = CGROUP_ROOT) -> tuple[Path, str]:
    """The file to write, and what, to freeze the sandbox (for a script that cannot wait for it)."""
    if is_pure_v2(root):
        return root / parent / name / "cgroup.freeze", "1"
    return _v1_state(parent, name, root), "FROZEN"


def freeze(parent: str, name: str, *, root: Path = CGROUP_ROOT, timeout: float = 10.0) -> None:
    """Freeze every process of the sandbox; returns once they are all frozen."""
    if is_pure_v2(root):
        d = root / parent / name
        (d / "cgroup.freeze").write_text("1")
        _wait(lambda: "frozen 1" in (d / "cgroup.events").read_text(), timeout)
        return
    state = _v1_state(parent, name, root)
    state.write_text("FROZEN")

    def frozen() -> bool:
        now = state.read_text().strip()
        if now == "FREEZING":
            state.write_text("FROZEN")  # the v1 freezer can stall on a task that was busy: ask again
        return now == "FROZEN"

    _wait(frozen, timeout)


def thaw(parent: str, name: str, *, root: Path = CGROUP_ROOT) -> None:
    """Let the sandbox run again (nothing if its cgroup is gone)."""
    try:
        if is_pure_v2(root):
            (root / parent / name / "cgroup.freeze").write_text("0")
        else:
            _v1_state(parent, name, root).write_text("THAWED")
    except FileNotFoundError:
        pass


def _wait(done: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    delay = 0.0005
    while not done():
        if time.monotonic() > end:
            raise FreezeError(f"the sandbox did not freeze within {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
