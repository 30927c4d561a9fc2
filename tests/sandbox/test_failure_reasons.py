"""A failed destroy says what failed, in words, without host paths; the detail is in the server's log (D5).

The fault is real: the VM's btrfs volume is made immutable on the host (``chattr +i``), so the kernel refuses
``btrfs subvolume delete`` (EPERM). Before, the VM recorded ``internal error: CommandFailed``.
"""

from __future__ import annotations

import subprocess

from tests.support import Account, Server
from tests.vmtools import create_ready, destroy


def test_a_failed_destroy_names_what_failed(node: Server, owner: Account) -> None:
    vm = create_ready(owner.client)
    volume = node.data_dir / "node" / "disk" / "vols" / vm["id"]
    assert volume.is_dir()
    assert owner.client.post(f"/v1/vms/{vm['id']}/stop").status_code == 200
    subprocess.run(["chattr", "+i", str(volume)], check=True)
    try:
        resp = owner.client.delete(f"/v1/vms/{vm['id']}")
        assert resp.status_code == 500, resp.text
        assert resp.json()["error"]["code"] == "vm_failed"
        failed = owner.client.get(f"/v1/vms/{vm['id']}").json()
        reason = failed["failure_reason"]
        assert failed["status"] == "failed"
        assert reason == (
            "deleting the sandbox's disk failed: the host refused the operation (permissions) "
            "(btrfs subvolume delete exited with status 1)"
        )
        assert "/" not in resp.json()["error"]["message"]
        assert "CommandFailed" not in reason
    finally:
        subprocess.run(["chattr", "-i", str(volume)], check=True)
    log = node.log.read_text()
    assert f"destroy of {vm['id']} failed" in log
    # the operator's detail, in the log only: the command's stderr and the traceback
    assert "Could not destroy subvolume/snapshot: Operation not permitted" in log
    destroy(owner.client, vm["id"])  # the VM is failed: destroying it again works now
    assert owner.client.get(f"/v1/vms/{vm['id']}").json()["status"] == "destroyed"
    assert not volume.exists()
