"""Two Corral instances on one host (issue 13, finding 16): different data dirs, ports, gateway namespaces
and uplinks. Stopping one and resetting its node leaves nothing of it pinned by the other (its egress process
runs in a mount namespace copied while the first one's pool was mounted), and the other keeps creating and
running commands; neither touches the other's mounts, loop devices, namespaces or cgroups."""

from __future__ import annotations

from pathlib import Path

from corral.runtime.disk import loop_device_of
from tests.support import NodeHost, node_host, node_server, reset_node, signup
from tests.vmtools import create_ready, destroy, netns_names, run


def _mounted_anywhere(path: Path) -> list[str]:
    """The processes (pid) whose mount namespace has something mounted at or under ``path``."""
    holders: list[str] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            mounts = (proc / "mountinfo").read_text().splitlines()
        except OSError:
            continue
        if any(line.split()[4].startswith(str(path)) for line in mounts):
            holders.append(proc.name)
    return holders


def _cgroup_parent(root: Path) -> Path:
    return Path("/sys/fs/cgroup/memory") / f"corral-{(root / 'node-id').read_text().strip()}"


def test_reset_of_one_instance_leaves_the_other_alone(tmp_path: Path) -> None:
    with node_host(tmp_path, CORRAL_SANDBOX_SUBNET="10.91.0.0/24") as first:
        a_server = first.start()
        a = signup(a_server)
        a_vm = create_ready(a.client, disk_mib=64, mem_mib=64)
        a_root = first.node_root
        before = netns_names()
        with node_server(tmp_path, CORRAL_SANDBOX_SUBNET="10.92.0.0/24") as b_server:
            b = signup(b_server)
            b_vm = create_ready(b.client, disk_mib=64, mem_mib=64)
            b_root = b_server.data_dir / "node"
            b_loop = loop_device_of(b_root / "disk.img")
            b_netns = netns_names() - before
            assert b_netns, "the second instance's namespaces"
            assert b_loop is not None
            # the first instance still works beside the second
            assert run(a.client, a_vm["id"], "echo a")["stdout"] == "a\n"
            # the second's egress process (started after the first's pool was mounted) holds a copy of it
            assert _mounted_anywhere(a_root / "disk"), "expected the pool to be mounted"

            # the first instance stops and its node is reset
            destroy(a.client, a_vm["id"])
            a.client.close()
            first.stop()
            reset_node(first.data_dir, first.env)

            # nothing of it is left, not even in the second's namespaces
            assert loop_device_of(a_root / "disk.img") is None
            assert not _mounted_anywhere(a_root), _mounted_anywhere(a_root)
            assert not _cgroup_parent(a_root).exists()
            # the second's own are untouched, and it goes on creating and running commands
            assert loop_device_of(b_root / "disk.img") == b_loop
            assert any(line.split()[4] == str(b_root / "disk") for line in _mountinfo())
            assert _cgroup_parent(b_root).is_dir()
            assert b_netns <= netns_names()
            assert run(b.client, b_vm["id"], "echo b")["stdout"] == "b\n"
            again = create_ready(b.client, disk_mib=64, mem_mib=64)
            assert run(b.client, again["id"], "echo again")["stdout"] == "again\n"
            for vm in (b_vm, again):
                destroy(b.client, vm["id"])
            b.client.close()
            _restart_still_works(first)


def _restart_still_works(first: NodeHost) -> None:
    """The reset instance starts again on its data dir (a new pool mount, a new loop device)."""
    server = first.start()
    acct = signup(server)
    vm = create_ready(acct.client, disk_mib=64, mem_mib=64)
    assert run(acct.client, vm["id"], "echo back")["stdout"] == "back\n"
    destroy(acct.client, vm["id"])
    acct.client.close()


def _mountinfo() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()
