"""Command lines of checkpoint, restore and detached exec (crun and runc), and the freezer's file protocol on
a directory laid out like the cgroup trees (v1 and v2)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from corral.runtime import freezer
from corral.runtime.argv import RuntimeCli

CRUN = RuntimeCli("/opt/corral/bin/crun", "/state")
RUNC = RuntimeCli("/usr/sbin/runc", "/state")


def test_checkpoint_skips_the_network_lock_where_the_runtime_can() -> None:
    assert CRUN.checkpoint("c1", "/img", "/work", leave_running=True) == [
        "/opt/corral/bin/crun", "--root", "/state", "checkpoint", "--image-path", "/img", "--work-path", "/work",
        "--leave-running", "--network-lock", "skip", "c1",
    ]  # fmt: skip
    assert RUNC.checkpoint("c1", "/img", "/work", leave_running=False) == [
        "/usr/sbin/runc", "--root", "/state", "checkpoint", "--image-path", "/img", "--work-path", "/work", "c1",
    ]  # fmt: skip


def test_restore_is_detached_with_a_pid_file() -> None:
    argv = CRUN.restore("c2", "/b", "/img", "/w", "/b/init.pid")
    assert argv[:4] == ["/opt/corral/bin/crun", "--root", "/state", "restore"]
    assert argv[-1] == "c2"
    for flag, value in (
        ("--bundle", "/b"),
        ("--image-path", "/img"),
        ("--work-path", "/w"),
        ("--pid-file", "/b/init.pid"),
    ):
        assert argv[argv.index(flag) + 1] == value
    assert "--detach" in argv
    assert "--network-lock" not in RUNC.restore("c2", "/b", "/img", "/w", "/p")


def test_detached_exec_keeps_no_new_privs_and_hands_over_fds() -> None:
    assert CRUN.exec_detached("c1", ["/.corral/init", "--serve"], preserve_fds=1) == [
        "/opt/corral/bin/crun", "--root", "/state", "exec", "--detach", "--no-new-privs", "--preserve-fds", "1",
        "c1", "/.corral/init", "--serve",
    ]  # fmt: skip
    assert "--preserve-fds" not in RUNC.exec_detached("c1", ["true"])


def v1_tree(root: Path) -> Path:
    state = root / "freezer" / "corral-n" / "c1" / "freezer.state"
    state.parent.mkdir(parents=True)
    state.write_text("THAWED\n")
    return state


def test_v1_freeze_waits_for_frozen_and_asks_again_while_freezing(tmp_path: Path) -> None:
    state = v1_tree(tmp_path)
    writes: list[str] = []

    def kernel() -> None:  # the kernel's side: FREEZING for a moment, then FROZEN
        time.sleep(0.05)
        writes.append(state.read_text().strip())
        state.write_text("FREEZING")
        time.sleep(0.05)
        state.write_text("FROZEN")

    t = threading.Thread(target=kernel)
    t.start()
    freezer.freeze("corral-n", "c1", root=tmp_path, timeout=5)
    t.join()
    assert writes == ["FROZEN"]
    assert state.read_text() == "FROZEN"
    freezer.thaw("corral-n", "c1", root=tmp_path)
    assert state.read_text() == "THAWED"


def test_freeze_gives_up_after_the_timeout(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu\n")
    d = tmp_path / "corral-n" / "c1"
    d.mkdir(parents=True)
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")  # a cgroup that never freezes
    with pytest.raises(freezer.FreezeError):
        freezer.freeze("corral-n", "c1", root=tmp_path, timeout=0.1)


def test_v2_freeze_and_thaw(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    d = tmp_path / "corral-n" / "c1"
    d.mkdir(parents=True)
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    freezer.freeze("corral-n", "c1", root=tmp_path, timeout=1)
    assert (d / "cgroup.freeze").read_text() == "1"
    freezer.thaw("corral-n", "c1", root=tmp_path)
    assert (d / "cgroup.freeze").read_text() == "0"


def test_thaw_of_a_gone_cgroup_is_fine(tmp_path: Path) -> None:
    freezer.thaw("corral-n", "gone", root=tmp_path)
