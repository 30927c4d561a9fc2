"""The sandbox network across a crash of ``corral serve``: the egress process dies with the server (the
kernel's parent-death signal), the gateway and the links of running sandboxes stay, the restarted server
starts a new egress process and adopted sandboxes reach the outside again; a link left for a sandbox that
no longer exists is reclaimed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx

from tests.fakenet import FakeInternet
from tests.sandbox.conftest import internet_env
from tests.support import node_host, signup
from tests.vmtools import create_ready, destroy, run


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _fetch(c: httpx.Client, vm_id: str) -> dict[str, object]:
    out = run(c, vm_id, "curl -sS -m 5 http://allowed.test/after")
    assert out["exit_code"] == 0, out
    body: dict[str, object] = json.loads(out["stdout"])
    return body


def test_network_survives_a_server_crash(tmp_path: Path, internet: FakeInternet) -> None:
    # the session's node server is on this fake internet too: another uplink subnet
    with node_host(tmp_path, **internet_env(internet, "100.127.89.0/30")) as host:
        server = host.start()
        acct = signup(server)
        assert acct.client.post("/v1/egress/rules", json={"host": "allowed.test"}).status_code == 201
        vm = create_ready(acct.client)
        assert _fetch(acct.client, vm["id"])["host_addr"] == "198.18.1.1"
        pid_file = host.data_dir / "egress" / "egress.pid"
        old_egress = int(pid_file.read_text())
        assert _alive(old_egress)

        host.kill()
        deadline = time.monotonic() + 5
        while _alive(old_egress) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(old_egress), "the egress process outlived the server"

        gateway = host.env["CORRAL_GATEWAY_NETNS"]
        subprocess.run(
            ["ip", "-n", gateway, "link", "add", "cs999", "type", "veth", "peer", "name", "cs999p"],
            check=True,
        )
        subprocess.run(["ip", "-n", gateway, "link", "set", "cs999", "alias", "vm_ghost"], check=True)

        server = host.start()
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {acct.token}"}, timeout=60
        ) as c:
            assert int(pid_file.read_text()) != old_egress
            assert _fetch(c, vm["id"])["host_addr"] == "198.18.1.1"
            links = subprocess.run(
                ["ip", "-n", gateway, "-o", "link", "show"], capture_output=True, text=True, check=True
            ).stdout
            assert "cs999" not in links, "a link of a gone sandbox was not reclaimed"
            destroy(c, vm["id"])
