"""Sandbox state across a crash of ``corral serve`` (SIGKILL, started again on the same data dir and database):
a hibernated VM resumes with its processes, a snapshot boots a new VM, a checkpoint can still be rolled back
to, and captures nothing refers to any more are removed."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx

from tests.sandbox.test_state import captures, count, start_counter, wait_count, wait_snapshot
from tests.support import NodeHost, node_host, signup
from tests.vmtools import create_ready, destroy, host_leftovers, public_key, run, unique_name, wait_detail


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


KILL_DELAYS_MS = (10, 60, 120)  # before, during and after the host work of each (~100-300 ms)


def test_a_kill_during_a_state_operation_leaves_no_vm_stuck_and_nothing_behind(tmp_path: Path) -> None:
    """``corral serve`` killed at several moments of a hibernate, a resume and a fork: after the restart every
    VM is usable (ready, or hibernated and resumable, or failed and destroyable), and once they are destroyed
    nothing of them is left on the host."""
    with node_host(tmp_path) as host:
        server = host.start()
        acct = signup(server)
        token = acct.token

        def client() -> httpx.Client:
            assert host.server is not None
            return httpx.Client(
                base_url=host.server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
            )

        seen: dict[str, set[str]] = {}
        for op in ("hibernate", "resume", "fork"):
            for delay in KILL_DELAYS_MS:
                with client() as c:
                    vm = create_ready(c)
                    start_counter(c, vm["id"])
                    if op == "resume":
                        assert c.post(f"/v1/vms/{vm['id']}/hibernate").status_code == 200
                    body = {"count": 2} if op == "fork" else None
                    sender = threading.Thread(
                        target=_post_quietly, args=(host, token, f"/v1/vms/{vm['id']}/{op}", body)
                    )
                    sender.start()
                    time.sleep(delay / 1000)
                host.kill()
                sender.join()
                host.start()
                with client() as c:
                    for row in c.get("/v1/vms", params={"limit": 100}).json()["data"]:
                        if row["status"] == "destroyed":
                            continue
                        detail = row["status_detail"]
                        seen.setdefault(op, set()).add(detail)
                        assert detail in ("ready", "hibernated", "failed"), (op, delay, row)
                        if detail == "hibernated":
                            r = c.post(f"/v1/vms/{row['id']}/resume")
                            assert r.status_code == 200, (op, delay, r.text)
                            detail = "ready"
                        if detail == "ready":
                            assert run(c, row["id"], "true")["exit_code"] == 0, (op, delay)
                            if row["id"] == vm["id"]:
                                wait_count(c, row["id"], above=count(c, row["id"]))
                        destroy(c, row["id"])
                assert host.server is not None
                assert captures(host.server) == set(), (op, delay)
        left = host_leftovers(host.node_root, host.node_id)
        assert left == {kind: set() for kind in left}, left
        # the kills landed before, during and after the operations
        assert {"ready", "hibernated"} <= seen["hibernate"] | seen["resume"], seen


def _post_quietly(host: NodeHost, token: str, path: str, body: dict[str, int] | None) -> None:
    """Send a request the server may be killed in the middle of."""
    assert host.server is not None
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(
            f"{host.server.url}{path}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
