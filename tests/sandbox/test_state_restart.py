"""Sandbox state across a crash of ``corral serve`` (SIGKILL, started again on the same data dir and database):
a hibernated VM resumes with its processes, a snapshot boots a new VM, a checkpoint can still be rolled back
to, and captures nothing refers to any more are removed."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.sandbox.test_state import captures, count, start_counter, wait_count, wait_snapshot
from tests.support import node_host, signup
from tests.vmtools import create_ready, destroy, public_key, unique_name, wait_detail


def test_state_survives_a_server_crash(tmp_path: Path) -> None:
    with node_host(tmp_path) as host:
        server = host.start()
        acct = signup(server)
        c = acct.client
        sleeper = create_ready(c)
        runner = create_ready(c)
        start_counter(c, sleeper["id"])
        start_counter(c, runner["id"])
        r = c.post(f"/v1/vms/{runner['id']}/checkpoints", json={"name": "before"})
        assert r.status_code == 201, r.text
        ckpt = r.json()["data"]
        at_checkpoint = count(c, runner["id"])
        snap = wait_snapshot(c, c.post(f"/v1/vms/{runner['id']}/snapshots").json()["data"]["id"])
        assert snap["status"] == "ready", snap
        before = count(c, sleeper["id"])
        assert c.post(f"/v1/vms/{sleeper['id']}/hibernate").status_code == 200
        # a capture of a fork that the crash interrupted, which nothing refers to
        states = host.data_dir / "node" / "disk" / "states"
        (states / "fork-vm_interrupted0").mkdir()

        host.kill()
        server = host.start()
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {acct.token}"}, timeout=60
        ) as c:
            assert c.get(f"/v1/vms/{sleeper['id']}").json()["status_detail"] == "hibernated"
            assert c.get(f"/v1/vms/{runner['id']}").json()["status_detail"] == "ready"
            assert "fork-vm_interrupted0" not in {p.name for p in states.iterdir()}

            r = c.post(f"/v1/vms/{sleeper['id']}/resume")
            assert r.status_code == 200, r.text
            resumed = count(c, sleeper["id"])
            assert resumed >= before
            wait_count(c, sleeper["id"], above=resumed)

            later = wait_count(c, runner["id"], above=at_checkpoint + 10)
            r = c.post(f"/v1/vms/{runner['id']}/rollback", json={"checkpoint_id": ckpt["id"]})
            assert r.status_code == 200, r.text
            assert at_checkpoint <= count(c, runner["id"]) < later

            r = c.post(
                "/v1/vms", json={"name": unique_name(), "public_key": public_key(), "snapshot_id": snap["id"]}
            )
            assert r.status_code == 201, r.text
            new = wait_detail(c, r.json()["id"])
            assert new["status_detail"] == "ready", new
            wait_count(c, new["id"], above=count(c, new["id"]))

            for vm_id in (sleeper["id"], runner["id"], new["id"]):
                destroy(c, vm_id)
            assert c.delete(f"/v1/snapshots/{snap['id']}").status_code == 204
            assert captures(server) == set()
