"""crun's precondition on a cgroup v1 hybrid host, on the real kernel: no controller in the unified tree.

A node mounts hugetlb as its own v1 hierarchy (the kernel leaves it in the unified tree otherwise). When that
hierarchy goes away while the node runs (unmounted by someone else; or unmounted, before the node started,
while it had children: the kernel keeps it unmounted, the node saw nothing to do, and CRIU's own mount and
unmount of it during a dump let it go; what broke a test run), hugetlb is back in the unified tree and crun
refuses every boot and restore. The node mounts a kept hierarchy again when it starts, and checks before each
boot and restore.

These tests unmount the host's hugetlb hierarchy, so they need it to hold no cgroup of anyone else's (with
children, an unmount leaves the hierarchy alive and nothing is back in the unified tree): they run before the
sandbox tests start their shared node, and skip if something else holds cgroups there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.runtime import cgroups
from tests.support import Server, node_server, signup
from tests.vmtools import (
    create_ready,
    destroy,
    run,
    spare_v1_mount,
    unmount_v1,
    v1_hierarchy_of,
    wait_detail,
)

ROOT = Path("/sys/fs/cgroup")
HUGETLB = ROOT / "hugetlb"

pytestmark = pytest.mark.skipif(
    cgroups.is_pure_v2() or not (ROOT / "unified").is_dir(), reason="a cgroup v1 hybrid host only"
)


def _hugetlb_hierarchy() -> str:
    hierarchy = v1_hierarchy_of("hugetlb")
    if hierarchy is None:
        pytest.skip("this kernel has no hugetlb controller")
    return hierarchy


def _unmount_hugetlb() -> None:
    """Unmount the host's hugetlb hierarchy (this node's empty cgroups in it first) until the kernel hands
    hugetlb back to the unified tree: what crun then refuses."""
    assert os.path.ismount(HUGETLB), "the node did not mount hugetlb"
    for d in sorted(HUGETLB.glob("corral-*/**/"), key=lambda p: -len(p.parts)):
        os.rmdir(d)  # empty: a hibernated or never-booted sandbox holds no process
    others = [p.name for p in HUGETLB.iterdir() if p.is_dir()]
    if others:
        pytest.skip(f"the hugetlb hierarchy holds other cgroups ({others}): unmounting it would keep it")
    unmount_v1("hugetlb")
    assert not cgroups.unified_is_empty()
    assert _hugetlb_hierarchy() == "0"


KEPT_CHILD = "corral-layout-test"


@pytest.fixture(scope="module")
def kept_hierarchy() -> Iterator[str]:
    """A hugetlb hierarchy the kernel keeps unmounted (unmounted while it had a child), as a test run, or
    anyone, can leave on the host; the unified tree is empty meanwhile, so there seems nothing to do."""
    _hugetlb_hierarchy()
    if os.path.ismount(HUGETLB):
        if any(p.is_dir() for p in HUGETLB.iterdir()):
            pytest.skip("the hugetlb hierarchy holds other cgroups: these tests would disturb them")
        unmount_v1("hugetlb")
    with spare_v1_mount("hugetlb") as spare:
        (spare / KEPT_CHILD).mkdir()
    assert cgroups.unified_is_empty()
    assert not os.path.ismount(HUGETLB)
    kept = _hugetlb_hierarchy()
    assert kept != "0"
    yield kept
    remounted = not os.path.ismount(HUGETLB)  # a failed test: the node did not mount it
    if remounted:
        HUGETLB.mkdir(exist_ok=True)
        cgroups.mount_v1("hugetlb", HUGETLB)
    with contextlib.suppress(FileNotFoundError):
        (HUGETLB / KEPT_CHILD).rmdir()
    if remounted:
        unmount_v1("hugetlb")  # and see the kernel let it go


@pytest.fixture(scope="module")
def layout_node(tmp_path_factory: pytest.TempPathFactory, kept_hierarchy: str) -> Iterator[Server]:
    with node_server(tmp_path_factory.mktemp("layout")) as srv:
        yield srv


@pytest.fixture
def client(layout_node: Server) -> Iterator[httpx.Client]:
    acct = signup(layout_node)
    yield acct.client
    acct.client.close()


def test_the_node_mounts_a_kept_hierarchy_as_it_starts(layout_node: Server, kept_hierarchy: str) -> None:
    """Left unmounted, the kept hierarchy would be let go by CRIU's first mount and unmount of it, and every
    boot and restore after that would fail; mounted by the node, it stays."""
    assert os.path.ismount(HUGETLB)
    assert _hugetlb_hierarchy() == kept_hierarchy
    assert (HUGETLB / KEPT_CHILD).is_dir()
    (HUGETLB / KEPT_CHILD).rmdir()
    assert cgroups.unified_is_empty()


def test_a_boot_mounts_hugetlb_again_when_it_is_back_in_the_unified_tree(client: httpx.Client) -> None:
    _unmount_hugetlb()
    vm = create_ready(client)  # without the node's check: failed, "cgroups in hybrid mode not supported"
    try:
        assert os.path.ismount(HUGETLB)
        assert cgroups.unified_is_empty()
        assert run(client, vm["id"], "echo up")["stdout"] == "up\n"
    finally:
        destroy(client, vm["id"])


def test_a_resume_mounts_hugetlb_again_when_it_is_back_in_the_unified_tree(client: httpx.Client) -> None:
    vm = create_ready(client)
    try:
        assert run(client, vm["id"], "echo kept > /root/mark")["exit_code"] == 0
        resp = client.post(f"/v1/vms/{vm['id']}/hibernate")
        assert resp.status_code == 200, resp.text
        _unmount_hugetlb()
        resp = client.post(f"/v1/vms/{vm['id']}/resume")
        assert resp.status_code == 200, resp.text  # was 500 state_failed
        assert wait_detail(client, vm["id"])["status_detail"] == "ready"
        assert os.path.ismount(HUGETLB)
        assert run(client, vm["id"], "cat /root/mark")["stdout"] == "kept\n"
    finally:
        destroy(client, vm["id"])
