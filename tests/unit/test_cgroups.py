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
    assert cgroups.ensure_hybrid_layout(v2, mount=_no_mount) == []  # nothing to do on v2
    assert cgroups.unified_is_empty(v2)


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


def _no_mount(controller: str, target: Path) -> None:
    raise AssertionError(f"a test tried to mount {controller} at {target}")


# what this machine's kernel shows (hybrid: v1 controllers, a named systemd tree, an empty unified tree)
PROC_CGROUPS = """#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t3\t1\t1
cpu\t1\t1\t1
cpuacct\t2\t1\t1
blkio\t7\t1\t1
memory\t4\t27\t1
devices\t5\t1\t1
freezer\t6\t1\t1
net_cls\t0\t1\t1
perf_event\t0\t1\t1
net_prio\t0\t1\t1
hugetlb\t{hugetlb}\t1\t1
pids\t8\t1\t1
rdma\t9\t1\t0
"""
MOUNTINFO = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HUGETLB_MOUNTED = "42 31 0:39 / /sys/fs/cgroup/hugetlb rw,relatime - cgroup cgroup rw,hugetlb\n"


def test_a_controller_in_the_unified_tree_is_mounted() -> None:
    """hugetlb in no v1 hierarchy (hierarchy 0) is listed by the unified tree, which crun refuses."""
    assert cgroups.controllers_to_mount(PROC_CGROUPS.format(hugetlb=0), MOUNTINFO, "hugetlb\n") == ["hugetlb"]


def test_a_v1_hierarchy_nothing_mounts_is_mounted_again() -> None:
    """Unmounted while it had children, hugetlb's hierarchy (11) lives on with the unified tree empty, until
    the kernel lets it go at a moment of its own: it is mounted again (which pins it) before that."""
    assert cgroups.controllers_to_mount(PROC_CGROUPS.format(hugetlb=11), MOUNTINFO, "") == ["hugetlb"]


def test_a_host_as_crun_needs_it_needs_nothing() -> None:
    mountinfo = MOUNTINFO + HUGETLB_MOUNTED
    assert cgroups.controllers_to_mount(PROC_CGROUPS.format(hugetlb=11), mountinfo, "") == []
    # controllers mounted together count for each; v1-only ones with no hierarchy and disabled ones are not
    # crun's business
    joined = MOUNTINFO.replace("rw,cpu\n", "rw,cpu,cpuacct\n").replace(
        "33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n", ""
    )
    assert cgroups.controllers_to_mount(PROC_CGROUPS.format(hugetlb=11), joined + HUGETLB_MOUNTED, "") == []
    assert cgroups.controllers_to_mount("", "", "") == []


def test_ensure_hybrid_layout_mounts_what_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "unified").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "cgroups").write_text(PROC_CGROUPS.format(hugetlb=0))
    (proc / "self" / "mountinfo").write_text(MOUNTINFO)
    mounted: list[tuple[str, Path]] = []

    def mount(controller: str, target: Path) -> None:
        assert target.is_dir()
        mounted.append((controller, target))

    assert not cgroups.unified_is_empty(root)
    assert cgroups.ensure_hybrid_layout(root, proc=proc, mount=mount) == ["hugetlb"]
    assert mounted == [("hugetlb", root / "hugetlb")]

    # once it is mounted (as the kernel then shows), nothing more
    (root / "unified" / "cgroup.controllers").write_text("")
    (proc / "cgroups").write_text(PROC_CGROUPS.format(hugetlb=11))
    (proc / "self" / "mountinfo").write_text(MOUNTINFO + HUGETLB_MOUNTED)
    assert cgroups.unified_is_empty(root)
    assert cgroups.ensure_hybrid_layout(root, proc=proc, mount=_no_mount) == []
