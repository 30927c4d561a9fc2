"""Finding and removing a node's cgroups, on a fake cgroup tree of either layout (pure v2, v1 hybrid)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.runtime import cgroups


def _cgroup(path: Path, procs: str = "") -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.procs").write_text(procs)


@pytest.fixture(autouse=True)
def _cgroupfs_rmdir(monkeypatch: pytest.MonkeyPatch) -> None:
    """On cgroupfs a cgroup's files vanish with it; in this fake tree they must be removed first."""
    real_rmdir = os.rmdir

    def rmdir(path: str | os.PathLike[str]) -> None:
        for f in Path(path).iterdir():
            if f.is_file():
                f.unlink()
        real_rmdir(path)

    monkeypatch.setattr(os, "rmdir", rmdir)
    monkeypatch.setattr(os, "kill", _no_kill)  # the fake tree's pids are not ours to signal


def _no_kill(pid: int, sig: int) -> None:
    raise AssertionError(f"a test tried to kill pid {pid}")


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    tmp_path = tmp_path / "v2"
    _cgroup(tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    _cgroup(tmp_path)
    _cgroup(tmp_path / "corral-n1" / "vm_a")
    _cgroup(tmp_path / "corral-n1" / "vm_b")
    _cgroup(tmp_path / "corral-n2" / "vm_c")
    return tmp_path


@pytest.fixture
def hybrid(tmp_path: Path) -> Path:
    tmp_path = tmp_path / "hybrid"
    for ctrl in ("cpu", "memory", "pids", "unified"):
        _cgroup(tmp_path / ctrl)
        _cgroup(tmp_path / ctrl / "corral-n1" / "vm_a")
    _cgroup(tmp_path / "memory" / "corral-n1" / "vm_leftover")
    (tmp_path / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    return tmp_path


def test_pure_v2_is_one_tree(v2: Path) -> None:
    assert cgroups.is_pure_v2(v2)
    assert cgroups.hierarchies(v2) == [v2]
    assert cgroups.children("corral-n1", v2) == {"vm_a", "vm_b"}
    assert cgroups.ensure_hugetlb_v1(v2) is False  # nothing to do on v2


def test_hybrid_sees_every_controller(hybrid: Path) -> None:
    assert not cgroups.is_pure_v2(hybrid)
    assert [p.name for p in cgroups.hierarchies(hybrid)] == ["cpu", "memory", "pids", "unified"]
    assert cgroups.children("corral-n1", hybrid) == {"vm_a", "vm_leftover"}


def test_remove_one_sandbox_then_the_parent(hybrid: Path) -> None:
    cgroups.remove("corral-n1", "vm_a", hybrid)
    assert cgroups.children("corral-n1", hybrid) == {"vm_leftover"}
    assert (hybrid / "cpu" / "corral-n1").is_dir()  # the parent stays
    cgroups.remove("corral-n1", root=hybrid)
    assert not any((hybrid / c / "corral-n1").exists() for c in ("cpu", "memory", "pids", "unified"))
    cgroups.remove("corral-n1", "vm_a", hybrid)  # missing is fine


def test_remove_leaves_other_nodes_alone(v2: Path) -> None:
    cgroups.remove("corral-n1", root=v2)
    assert cgroups.children("corral-n1", v2) == set()
    assert cgroups.children("corral-n2", v2) == {"vm_c"}


def test_procs_and_stats_read_either_layout(v2: Path, hybrid: Path) -> None:
    (v2 / "corral-n1" / "vm_a" / "cgroup.procs").write_text("10\n11\n")
    assert cgroups.procs("corral-n1", "vm_a", v2) == {10, 11}
    (v2 / "corral-n1" / "vm_a" / "memory.current").write_text("4096\n")
    assert cgroups.read_stat("corral-n1", "vm_a", "memory", "memory.current", v2) == "4096"
    (hybrid / "memory" / "corral-n1" / "vm_a" / "memory.usage_in_bytes").write_text("8192\n")
    assert cgroups.read_stat("corral-n1", "vm_a", "memory", "memory.usage_in_bytes", hybrid) == "8192"
    assert cgroups.read_stat("corral-n1", "vm_zz", "memory", "memory.usage_in_bytes", hybrid) is None
