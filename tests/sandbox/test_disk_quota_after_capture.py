"""A sandbox's disk quota still holds after a capture (a fork), through a live server on the real kernel.

The capture's snapshot was made outside the parent qgroup: the kernel then marked the qgroups inconsistent
and stopped accounting, and from the first fork/snapshot/checkpoint on, every sandbox on the node could write
past its ``disk_mib`` (a full test run: the disk filler's 400 MiB in a 128 MiB sandbox succeeded). This node
runs without the periodic watch (``CORRAL_DISK_WATCH_S`` a day), whose rescan would only hide the fault a while.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from corral.runtime.disk import MIB, DiskPool
from tests.fakenet import FakeInternet
from tests.sandbox.conftest import internet_env
from tests.support import Account, Server, node_server, signup
from tests.vmtools import create_ready, destroy, run


@pytest.fixture(scope="module")
def quiet_node(tmp_path_factory: pytest.TempPathFactory, internet: FakeInternet) -> Iterator[Server]:
    with node_server(
        tmp_path_factory.mktemp("qnode"), CORRAL_DISK_WATCH_S="86400", **internet_env(internet)
    ) as srv:
        yield srv


def test_the_quota_holds_after_a_fork(quiet_node: Server) -> None:
    node = quiet_node
    owner: Account = signup(node)
    c = owner.client
    root = node.data_dir / "node"
    pool = DiskPool(root / "disk.img", root / "disk", 0)
    src = create_ready(c, disk_mib=96)
    made = [src["id"]]
    try:
        r = c.post(f"/v1/vms/{src['id']}/fork", json={"count": 1})  # memory and disk captured, then cloned
        assert r.status_code == 201, r.text
        made += [k["id"] for k in r.json()["data"]]
        assert pool.accounting_consistent(), "the capture left the pool's qgroups inconsistent"
        script = "dd if=/dev/zero of=/root/big bs=1M count=300; s=$?; sync; exit $s"
        for vm_id in made:
            fill = run(c, vm_id, ["bash", "-c", script])
            assert fill["exit_code"] != 0, fill
            assert "Disk quota exceeded" in fill["stderr"], fill
            size = int(run(c, vm_id, ["stat", "-c", "%s", "/root/big"])["stdout"])
            assert size <= 96 * MIB, size
    finally:
        for vm_id in made:
            destroy(c, vm_id)
        c.close()
