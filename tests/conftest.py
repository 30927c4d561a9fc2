from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Account, Server, running_server, signup
from tests.vmtools import unmount_v1


@pytest.fixture(scope="session", autouse=True)
def _restore_cgroup_layout(_leaves_the_host_as_it_found_it: None) -> Iterator[None]:
    """A node server mounts the hugetlb cgroup hierarchy (crun needs it on this host): unmount it after
    the run if it was not there before, and see the kernel let it go (not kept unmounted, to vanish under the
    next run), so the run leaves the machine as it found it."""
    target = Path("/sys/fs/cgroup/hugetlb")
    was_mounted = os.path.ismount(target)
    yield
    if not was_mounted and os.path.ismount(target):
        unmount_v1("hugetlb")
        with contextlib.suppress(OSError):
            target.rmdir()


@pytest.fixture(scope="session", autouse=True)
def _restore_netns_dir(_leaves_the_host_as_it_found_it: None) -> Iterator[None]:
    """The first ``ip netns add`` on a host bind-mounts /run/netns onto itself: undo that after the run if
    it was not so before and no namespace is left in it."""
    target = Path("/run/netns")
    was_mounted = _is_mount(target)
    yield
    if not was_mounted and _is_mount(target) and not any(target.iterdir()):
        subprocess.run(["umount", str(target)], check=False)


def _is_mount(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


def _host_state() -> set[str]:
    """What a test run could leave on this host: mounts, loop devices, Corral cgroups, network namespaces,
    links and nftables tables."""
    state = {f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    loops = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "BACK-FILE"], capture_output=True, text=True
    )
    state |= {f"loop {line.strip()}" for line in loops.stdout.splitlines() if line.strip()}
    state |= {f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob("*/corral-*")}
    netns = Path("/run/netns")
    state |= {f"netns {p.name}" for p in netns.iterdir()} if netns.is_dir() else set()
    state |= {f"link {p.name}" for p in Path("/sys/class/net").iterdir()}
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    state |= {f"nft {line.strip()}" for line in tables.stdout.splitlines() if line.strip()}
    return state


@pytest.fixture(scope="session", autouse=True)
def _leaves_the_host_as_it_found_it() -> Iterator[None]:
    """The whole run leaves no mount, loop device or cgroup behind (checked after every server stopped)."""
    before = _host_state()
    yield
    left = sorted(_host_state() - before)
    assert not left, "the test run left these on the host:\n" + "\n".join(left)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture
def account(server: Server) -> Iterator[Account]:
    acct = signup(server)
    yield acct
    acct.client.close()


@pytest.fixture
def other_account(server: Server) -> Iterator[Account]:
    acct = signup(server, first_name="Bob", last_name="Jones")
    yield acct
    acct.client.close()
