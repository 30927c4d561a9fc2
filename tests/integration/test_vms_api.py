"""The VMs API (``/v1/vms``, ``/v1/images``, the exec contract) against a real node server: the iron.sh
reference's examples field for field, every 409 and 404, name uniqueness (also under a race), validation,
list filters, sorting and paging.

One node server for the module (warm pool of 1); a fresh account per test so lists start empty. Every VM a
test creates is destroyed before it ends.
"""

from __future__ import annotations

import base64
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from corral.domain.ids import Prefix, new_id
from corral.store.db import make_engine, session_factory, transaction
from corral.store.tables import Vm
from tests.support import Account, Server, node_server, signup
from tests.vmtools import destroy, public_key, unique_name

MIB = 1024 * 1024
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
# The reference's fields, then the ones Corral documents on top.
REFERENCE_FIELDS = {"id", "name", "status", "status_detail", "created_at", "updated_at"}
EXTRA_FIELDS = {
    "image",
    "vcpus",
    "mem_mib",
    "disk_mib",
    "snapshot_id",
    "create_ms",
    "failure_reason",
    "egress",
    "timeout",
    "expires_at",
    "cpu_ms",
    "mem_peak_bytes",
    "uptime_ms",
    "destroy_reason",
    "destroyed_at",
}
VM_FIELDS = REFERENCE_FIELDS | EXTRA_FIELDS
EXEC_FIELDS = {
    "exit_code",
    "stdout",
    "stderr",
    "stdout_truncated",
    "stderr_truncated",
    "timed_out",
    "duration_ms",
}
# The reference's status table: status_detail -> status.
STATUS_OF = {
    "queued": "pending",
    "creating": "pending",
    "starting": "pending",
    "running": "running",
    "ready": "running",
    "stopping": "stopped",
    "stopped": "stopped",
    "destroying": "destroyed",
    "destroyed": "destroyed",
    "failed": "failed",
}
PENDING_DETAILS = {"queued", "creating", "starting"}
CPUS = max(1, os.cpu_count() or 1)  # the server's default CORRAL_MAX_VCPUS, on this same host


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # the documented extremes (a 64 GiB disk) must be admitted whatever this host's free space: the disk may
    # be overcommitted here (the pool's parent qgroup still holds what is written)
    with node_server(
        tmp_path_factory.mktemp("vms-api"), CORRAL_WARM_POOL_SIZE="1", CORRAL_OVERCOMMIT_DISK="4"
    ) as srv:
        yield srv


@pytest.fixture
def alice(node: Server) -> Iterator[Account]:
    acct = signup(node, first_name="Alice", last_name="Vms")
    yield acct
    acct.client.close()


@pytest.fixture
def bob(node: Server) -> Iterator[Account]:
    acct = signup(node, first_name="Bob", last_name="Vms")
    yield acct
    acct.client.close()


@dataclass
class Resident:
    """A VM that runs for the whole module, owned by its own account (for tests that do not change it)."""

    owner: Account
    vm: dict[str, Any]

    @property
    def id(self) -> str:
        vm_id: str = self.vm["id"]
        return vm_id


@pytest.fixture(scope="module")
def resident(node: Server) -> Iterator[Resident]:
    owner = signup(node, first_name="Rita", last_name="Resident")
    vm = wait_settled(owner.client, create(owner.client, name="resident")["id"])
    assert vm["status_detail"] == "ready", vm
    try:
        yield Resident(owner, vm)
    finally:
        destroy(owner.client, vm["id"])
        owner.client.close()


# --- helpers ----------------------------------------------------------------------------------------------


def is_timestamp(value: object) -> bool:
    return isinstance(value, str) and TIMESTAMP.fullmatch(value) is not None


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def assert_vm_shape(vm: dict[str, Any]) -> None:
    """Exactly the reference's fields plus Corral's extras, each of its type; status derived as the table says."""
    assert set(vm) == VM_FIELDS, vm
    assert isinstance(vm["id"], str), vm
    assert re.fullmatch(r"vm_[0-9a-z]+", vm["id"]), vm
    assert isinstance(vm["name"], str)
    assert vm["status_detail"] in STATUS_OF, vm
    assert vm["status"] == STATUS_OF[vm["status_detail"]], vm
    assert is_timestamp(vm["created_at"]), vm
    assert is_timestamp(vm["updated_at"]), vm
    assert vm["updated_at"] >= vm["created_at"], vm
    assert isinstance(vm["image"], str)
    assert vm["image"]
    assert all(is_int(vm[field]) for field in ("vcpus", "mem_mib", "disk_mib")), vm
    assert vm["snapshot_id"] is None or isinstance(vm["snapshot_id"], str)
    assert vm["create_ms"] is None or (is_int(vm["create_ms"]) and vm["create_ms"] >= 0), vm
    if vm["status"] == "failed":
        assert isinstance(vm["failure_reason"], str), vm
        assert vm["failure_reason"], vm
    else:
        assert vm["failure_reason"] is None, vm


def error_of(resp: httpx.Response, status: int, code: str) -> str:
    """Asserts the error envelope with this status and code and nothing else; returns the message."""
    assert resp.status_code == status, f"expected {status} {code}, got {resp.status_code} {resp.text[:500]}"
    assert resp.headers["content-type"].split(";")[0] == "application/json"
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert isinstance(message, str), body
    assert message.strip(), body
    return message


def assert_not_found(resp: httpx.Response, vm_id: str) -> None:
    assert resp.status_code == 404, resp.text
    assert resp.json() == {"error": {"code": "vm_not_found", "message": f"No VM with ID {vm_id}"}}


def create(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"name": unique_name(), "public_key": public_key(), **fields}
    resp = client.post("/v1/vms", json=body)
    assert resp.status_code == 201, resp.text
    vm: dict[str, Any] = resp.json()
    assert_vm_shape(vm)
    return vm


def wait_settled(
    client: httpx.Client, vm_id: str, timeout: float = 120.0, seen: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Poll GET /v1/vms/{id}, as the reference says, until the VM is no longer being provisioned: ready
    (running/ready) or failed. ``seen`` collects every answer."""
    deadline = time.monotonic() + timeout
    while True:
        resp = client.get(f"/v1/vms/{vm_id}")
        assert resp.status_code == 200, resp.text
        vm: dict[str, Any] = resp.json()
        if seen is not None:
            seen.append(vm)
        if vm["status_detail"] not in (*PENDING_DETAILS, "running") or time.monotonic() > deadline:
            return vm
        time.sleep(0.02)


def dispose(client: httpx.Client, vm_id: str) -> None:
    """Wait until the VM is out of pending, then stop it (if running) and destroy it (if not yet)."""
    wait_settled(client, vm_id)
    destroy(client, vm_id)


def listing(client: httpx.Client, **params: Any) -> dict[str, Any]:
    resp = client.get("/v1/vms", params=params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) == {"data", "has_more", "cursor"}, body
    assert isinstance(body["has_more"], bool)
    assert body["cursor"] is None or isinstance(body["cursor"], str)
    for vm in body["data"]:
        assert_vm_shape(vm)
    return body


def listed_ids(client: httpx.Client, **params: Any) -> list[str]:
    return [vm["id"] for vm in listing(client, limit=100, **params)["data"]]


def page_all(client: httpx.Client, limit: int, **params: Any) -> tuple[list[str], list[int]]:
    """Follow the cursor to the end: (every ID in the order seen, the size of each page)."""
    ids: list[str] = []
    sizes: list[int] = []
    cursor: str | None = None
    for _ in range(200):
        body = listing(client, limit=limit, **params, **({"cursor": cursor} if cursor else {}))
        assert len(body["data"]) <= limit
        ids += [vm["id"] for vm in body["data"]]
        sizes.append(len(body["data"]))
        if not body["has_more"]:
            assert body["cursor"] is None, body
            return ids, sizes
        assert isinstance(body["cursor"], str), body
        cursor = body["cursor"]
    raise AssertionError("paging did not finish")


def key_blob(key: str) -> str:
    return key.split()[1]


def ssh_string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


# --- the reference examples -------------------------------------------------------------------------------


def test_reference_vm_lifecycle_example(alice: Account) -> None:
    c = alice.client
    resp = c.post("/v1/vms", json={"name": "my-dev-env", "public_key": public_key()})
    assert resp.status_code == 201, resp.text
    vm = resp.json()
    assert_vm_shape(vm)
    vm_id = vm["id"]
    try:
        assert vm["name"] == "my-dev-env"
        assert vm["status"] == "pending"
        # the reference shows "creating"; Corral answers at once with "queued" (the boot runs afterwards)
        assert vm["status_detail"] in ("queued", "creating")
        assert vm["created_at"] == vm["updated_at"]
        created = datetime.strptime(vm["created_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert abs(datetime.now(UTC) - created) < timedelta(minutes=5)
        assert (vm["image"], vm["vcpus"], vm["mem_mib"], vm["disk_mib"]) == ("debian:bookworm", 1, 1024, 4096)
        assert (vm["snapshot_id"], vm["create_ms"], vm["failure_reason"]) == (None, None, None)

        # poll GET until running / ready; every answer on the way is a consistent VM object
        seen: list[dict[str, Any]] = []
        ready = wait_settled(c, vm_id, seen=seen)
        assert (ready["status"], ready["status_detail"]) == ("running", "ready"), ready
        for step in seen:
            assert_vm_shape(step)
            assert step["status"] in ("pending", "running"), step
            assert {k: step[k] for k in ("id", "name", "created_at")} == {
                k: vm[k] for k in ("id", "name", "created_at")
            }
        assert is_int(ready["create_ms"])

        # list ?status=running&limit=10 shows it, exactly as GET does
        body = listing(c, status="running", limit=10)
        assert body == {"data": [ready], "has_more": False, "cursor": None}

        got = c.get(f"/v1/vms/{vm_id}")
        assert got.status_code == 200
        assert got.json() == ready

        # stop: 200 and the full object, stopped
        stopped = c.post(f"/v1/vms/{vm_id}/stop")
        assert stopped.status_code == 200, stopped.text
        assert_vm_shape(stopped.json())
        assert (stopped.json()["status"], stopped.json()["status_detail"]) == ("stopped", "stopped")
        assert stopped.json()["id"] == vm_id
        assert c.get(f"/v1/vms/{vm_id}").json() == stopped.json()

        # start: 200 and the full object, running
        started = c.post(f"/v1/vms/{vm_id}/start")
        assert started.status_code == 200, started.text
        assert_vm_shape(started.json())
        assert started.json()["status"] == "running"
        assert started.json()["status_detail"] == "ready"
        assert c.get(f"/v1/vms/{vm_id}").json() == started.json()

        # destroy while running: the reference's 409, word for word
        refused = c.delete(f"/v1/vms/{vm_id}")
        assert refused.status_code == 409
        assert refused.json() == {
            "error": {"code": "vm_not_stopped", "message": "VM must be stopped before it can be destroyed"}
        }
        assert c.get(f"/v1/vms/{vm_id}").json()["status"] == "running"

        assert c.post(f"/v1/vms/{vm_id}/stop").status_code == 200
        deleted = c.delete(f"/v1/vms/{vm_id}")
        assert deleted.status_code == 204
        assert deleted.content == b""

        # the record is kept
        gone = c.get(f"/v1/vms/{vm_id}")
        assert gone.status_code == 200
        assert_vm_shape(gone.json())
        assert (gone.json()["status"], gone.json()["status_detail"]) == ("destroyed", "destroyed")
        assert listed_ids(c, status="destroyed") == [vm_id]
        assert listed_ids(c, status="running") == []
    finally:
        dispose(c, vm_id)


# --- 409s -------------------------------------------------------------------------------------------------


def test_every_conflict(alice: Account) -> None:
    c = alice.client
    vm_id = create(c)["id"]
    try:
        # pending or (handed over from the warm pool) already ready: not stopped either way
        error_of(c.delete(f"/v1/vms/{vm_id}"), 409, "vm_not_stopped")
        assert wait_settled(c, vm_id)["status_detail"] == "ready"

        # running
        error_of(c.post(f"/v1/vms/{vm_id}/start"), 409, "vm_already_running")
        error_of(c.delete(f"/v1/vms/{vm_id}"), 409, "vm_not_stopped")
        running = c.get(f"/v1/vms/{vm_id}").json()
        assert running["status_detail"] == "ready"

        # stopped
        assert c.post(f"/v1/vms/{vm_id}/stop").status_code == 200
        error_of(c.post(f"/v1/vms/{vm_id}/stop"), 409, "vm_not_running")
        error_of(c.post(f"/v1/vms/{vm_id}/exec", json={"command": "true"}), 409, "vm_not_running")
        error_of(c.post(f"/v1/vms/{vm_id}/exec/stream", json={"command": "true"}), 409, "vm_not_running")
        assert c.get(f"/v1/vms/{vm_id}").json()["status_detail"] == "stopped"

        # destroyed
        assert c.delete(f"/v1/vms/{vm_id}").status_code == 204
        error_of(c.delete(f"/v1/vms/{vm_id}"), 409, "vm_destroyed")
        error_of(c.post(f"/v1/vms/{vm_id}/stop"), 409, "vm_not_running")
        error_of(c.post(f"/v1/vms/{vm_id}/start"), 409, "vm_not_stopped")
        error_of(c.post(f"/v1/vms/{vm_id}/exec", json={"command": "true"}), 409, "vm_not_running")
        final = c.get(f"/v1/vms/{vm_id}").json()
        assert (final["status"], final["status_detail"]) == ("destroyed", "destroyed")
    finally:
        dispose(c, vm_id)


def test_concurrent_transitions_have_one_winner(node: Server, alice: Account) -> None:
    c = alice.client
    vm_id = create(c)["id"]
    clients = [node.client(alice.token) for _ in range(8)]

    def all_at_once(method: str, path: str) -> list[httpx.Response]:
        barrier = threading.Barrier(len(clients))

        def one(client: httpx.Client) -> httpx.Response:
            barrier.wait(timeout=30)
            return client.request(method, path)

        with ThreadPoolExecutor(max_workers=len(clients)) as pool:
            return list(pool.map(one, clients))

    def winners(answers: list[httpx.Response], ok: int, code: str) -> None:
        assert sorted(r.status_code for r in answers) == [ok] + [409] * (len(answers) - 1), [
            (r.status_code, r.text[:200]) for r in answers
        ]
        for resp in answers:
            if resp.status_code == 409:
                error_of(resp, 409, code)

    try:
        assert wait_settled(c, vm_id)["status_detail"] == "ready"
        winners(all_at_once("POST", f"/v1/vms/{vm_id}/stop"), 200, "vm_not_running")
        assert c.get(f"/v1/vms/{vm_id}").json()["status_detail"] == "stopped"
        winners(all_at_once("POST", f"/v1/vms/{vm_id}/start"), 200, "vm_already_running")
        assert c.get(f"/v1/vms/{vm_id}").json()["status_detail"] == "ready"
        assert c.post(f"/v1/vms/{vm_id}/stop").status_code == 200
        winners(all_at_once("DELETE", f"/v1/vms/{vm_id}"), 204, "vm_destroyed")
        assert c.get(f"/v1/vms/{vm_id}").json()["status_detail"] == "destroyed"
    finally:
        for client in clients:
            client.close()
        dispose(c, vm_id)


# --- 404s -------------------------------------------------------------------------------------------------


def test_unknown_malformed_and_other_users_ids_are_not_found(alice: Account, resident: Resident) -> None:
    c = alice.client
    for vm_id in (new_id(Prefix.VM), "vm_bad", "xyz", "vm_", "VM_K3MF9XVW2P", "sec_k3mf9xvw2p", resident.id):
        assert_not_found(c.get(f"/v1/vms/{vm_id}"), vm_id)
        assert_not_found(c.post(f"/v1/vms/{vm_id}/stop"), vm_id)
        assert_not_found(c.post(f"/v1/vms/{vm_id}/start"), vm_id)
        assert_not_found(c.delete(f"/v1/vms/{vm_id}"), vm_id)
        assert_not_found(c.post(f"/v1/vms/{vm_id}/exec", json={"command": "true"}), vm_id)
        assert_not_found(c.post(f"/v1/vms/{vm_id}/exec/stream", json={"command": "true"}), vm_id)
    # another user's VM is absent from every list and filter, and untouched by all of that
    assert listed_ids(c) == []
    assert listed_ids(c, name="resident") == []
    assert listed_ids(c, status="running") == []
    assert resident.owner.client.get(f"/v1/vms/{resident.id}").json()["status_detail"] == "ready"


# --- names ------------------------------------------------------------------------------------------------


def test_names_are_unique_among_live_vms_of_one_account(alice: Account, bob: Account) -> None:
    name = unique_name("taken")
    made: list[tuple[httpx.Client, str]] = []
    try:
        first = create(alice.client, name=name)
        made.append((alice.client, first["id"]))
        again = {"name": name, "public_key": public_key()}
        error_of(alice.client.post("/v1/vms", json=again), 409, "vm_name_taken")
        # another account may use the same name
        theirs = create(bob.client, name=name)
        made.append((bob.client, theirs["id"]))

        assert wait_settled(alice.client, first["id"])["status_detail"] == "ready"
        error_of(alice.client.post("/v1/vms", json=again), 409, "vm_name_taken")
        assert alice.client.post(f"/v1/vms/{first['id']}/stop").status_code == 200
        error_of(alice.client.post("/v1/vms", json=again), 409, "vm_name_taken")  # stopped is not destroyed
        assert listed_ids(alice.client, name=name) == [first["id"]]

        # once destroyed, the name is free again
        assert alice.client.delete(f"/v1/vms/{first['id']}").status_code == 204
        second = create(alice.client, name=name)
        made.append((alice.client, second["id"]))
        assert second["id"] != first["id"]
        assert listed_ids(alice.client, name=name) == [second["id"], first["id"]]
        assert listed_ids(bob.client, name=name) == [theirs["id"]]
        error_of(alice.client.post("/v1/vms", json=again), 409, "vm_name_taken")
        # and again: any number of destroyed VMs may share the name with the one live VM
        assert wait_settled(alice.client, second["id"])["status_detail"] == "ready"
        destroy(alice.client, second["id"])
        third = create(alice.client, name=name)
        made.append((alice.client, third["id"]))
        assert listed_ids(alice.client, name=name) == [third["id"], second["id"], first["id"]]
        assert listed_ids(alice.client, name=name, status="destroyed") == [second["id"], first["id"]]
    finally:
        for client, vm_id in made:
            dispose(client, vm_id)


def test_concurrent_creates_with_one_name_make_one_vm(node: Server, alice: Account) -> None:
    name = unique_name("race")
    body = {"name": name, "public_key": public_key()}
    threads = 10
    barrier = threading.Barrier(threads)
    clients = [node.client(alice.token) for _ in range(threads)]

    def attempt(client: httpx.Client) -> httpx.Response:
        barrier.wait(timeout=30)
        return client.post("/v1/vms", json=body)

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            answers = list(pool.map(attempt, clients))
    finally:
        for client in clients:
            client.close()
    created = [r.json()["id"] for r in answers if r.status_code == 201]
    try:
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [201] + [409] * (threads - 1), [(r.status_code, r.text[:200]) for r in answers]
        for resp in answers:
            if resp.status_code == 409:
                error_of(resp, 409, "vm_name_taken")
        assert listed_ids(alice.client, name=name) == created
    finally:
        for vm_id in created:
            dispose(alice.client, vm_id)


# --- validation -------------------------------------------------------------------------------------------


def _bad_keys() -> dict[str, str]:
    key = public_key()
    blob = key_blob(key)
    rsa_named_ed = base64.b64encode(ssh_string(b"ssh-rsa") + base64.b64decode(blob)[15:]).decode()
    return {
        "not-a-key": "not a key",
        "type-only": "ssh-ed25519",
        "blob-only": blob,
        "unknown-type": f"ssh-dss {blob}",
        "private-key": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
        "bad-base64": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5!!!!",
        "truncated-base64": f"ssh-ed25519 {blob[:-3]}",
        "too-short": "ssh-ed25519 AAAA",
        "type-mismatch": f"ssh-rsa {blob}",
        "blob-says-rsa": f"ssh-ed25519 {rsa_named_ed}",
        "empty": "",
        "blank": "   ",
        "too-long": f"ssh-ed25519 {blob} " + "c" * 16384,
        "options-prefix": f'command="sh" {key}',
    }


BAD_NAMES = {
    "empty": "",
    "leading-dash": "-dev",
    "leading-dot": ".dev",
    "leading-underscore": "_dev",
    "space": "my dev",
    "slash": "my/dev",
    "backslash": "my\\dev",
    "semicolon": "dev;rm",
    "newline": "dev\nx",
    "tab": "dev\tx",
    "unicode": "dév",
    "emoji": "dev🐄",
    "too-long": "a" * 65,
    "nul": "dev\x00",
}


def _validation_cases() -> list[tuple[str, dict[str, Any], int, str]]:
    key = public_key()
    ok = {"name": "valid-name", "public_key": key}
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("missing-name", {"public_key": key}, 422, "validation_error"),
        ("missing-public-key", {"name": "valid-name"}, 422, "validation_error"),
        ("empty-object", {}, 422, "validation_error"),
        ("name-null", {**ok, "name": None}, 422, "validation_error"),
        ("name-int", {**ok, "name": 1}, 422, "validation_error"),
        ("name-list", {**ok, "name": ["valid-name"]}, 422, "validation_error"),
        ("public-key-null", {**ok, "public_key": None}, 422, "validation_error"),
        ("public-key-int", {**ok, "public_key": 1}, 422, "validation_error"),
        ("public-key-list", {**ok, "public_key": [key]}, 422, "validation_error"),
        ("unknown-field", {**ok, "unexpected": 1}, 422, "validation_error"),
        ("unknown-field-id", {**ok, "id": "vm_k3mf9xvw2p"}, 422, "validation_error"),
        ("unknown-field-status", {**ok, "status": "running"}, 422, "validation_error"),
        ("image-int", {**ok, "image": 1}, 422, "validation_error"),
        ("snapshot-id-int", {**ok, "snapshot_id": 1}, 422, "validation_error"),
    ]
    cases += [
        (f"public-key-{label}", {**ok, "public_key": v}, 422, "validation_error")
        for label, v in _bad_keys().items()
    ]
    cases += [(f"name-{label}", {**ok, "name": v}, 422, "validation_error") for label, v in BAD_NAMES.items()]
    out_of_range: dict[str, list[Any]] = {
        "vcpus": [0, -1, CPUS + 1, 1000, 2**63, "1", 1.5, True],
        "mem_mib": [0, -1, 63, 8193, 2**31, "1024", 1024.0, False],
        "disk_mib": [0, -1, 63, 65537, 2**31, "4096", 4096.5],
    }
    for field, values in out_of_range.items():
        for value in values:
            cases.append((f"{field}-{value!r}", {**ok, field: value}, 422, "validation_error"))
    cases += [
        ("unknown-image", {**ok, "image": "nosuch:image"}, 404, "image_not_found"),
        ("snapshot", {**ok, "snapshot_id": "snap_abc123"}, 404, "snapshot_not_found"),
        ("snapshot-unknown-shape", {**ok, "snapshot_id": "whatever"}, 404, "snapshot_not_found"),
    ]
    return cases


def refuse_all(client: httpx.Client, cases: list[tuple[str, dict[str, Any], int, str]]) -> list[str]:
    """Send each create; return what went wrong. Each case gets its own name (unless it is about the name),
    so one wrongly accepted request cannot turn the next into a 409; anything created is destroyed."""
    failures: list[str] = []
    created: list[str] = []
    try:
        for n, (label, body, status, code) in enumerate(cases):
            sent = {**body, "name": f"case-{n}"} if body.get("name") == "valid-name" else body
            resp = client.post("/v1/vms", json=sent)
            if resp.status_code == 201:
                created.append(resp.json()["id"])
            try:
                message = error_of(resp, status, code)
            except AssertionError as exc:
                failures.append(f"{label}: {exc}")
                continue
            if code == "image_not_found":
                assert "corral image build" in message, message
                assert "corral image import" in message, message
                assert sent["image"] in message, message
    finally:
        for vm_id in created:
            dispose(client, vm_id)
    return failures


def test_bad_create_requests_are_refused_and_leave_nothing(alice: Account) -> None:
    c = alice.client
    failures = refuse_all(c, _validation_cases())
    # bodies that are not JSON objects
    for label, raw, status, code in (
        ("bad-json", b'{"name": "x",', 400, "invalid_json"),
        ("array", b"[]", 422, "validation_error"),
        ("null", b"null", 422, "validation_error"),
        ("empty", b"", 422, "validation_error"),
    ):
        resp = c.post("/v1/vms", content=raw, headers={"Content-Type": "application/json"})
        try:
            error_of(resp, status, code)
        except AssertionError as exc:
            failures.append(f"{label}: {exc}")
    assert not failures, "\n".join(failures)
    # not one of them made a VM, in any state
    assert listing(c, limit=100) == {"data": [], "has_more": False, "cursor": None}


def test_public_key_is_a_single_key_line(alice: Account) -> None:
    """One OpenSSH key per value: a newline would smuggle a second key (or an options line such as
    ``command="..."``) into the VM's authorized_keys."""
    key = public_key()
    blob = key_blob(key)
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        (label, {"name": "valid-name", "public_key": value}, 422, "validation_error")
        for label, value in (
            ("two-lines", f"{key}\n{key}"),
            ("comment-then-options-line", f'ssh-ed25519 {blob} me\ncommand="sh" ssh-ed25519 {blob}'),
            ("comment-with-carriage-return", f"ssh-ed25519 {blob} me\rssh-ed25519 {blob}"),
        )
    ]
    failures = refuse_all(alice.client, cases)
    assert not failures, "\n".join(failures)
    assert listing(alice.client, limit=100)["data"] == []


def test_documented_extremes_are_accepted(alice: Account) -> None:
    c = alice.client
    made: list[str] = []
    try:
        high = create(c, name="A" * 64, vcpus=CPUS, mem_mib=8192, disk_mib=65536, image="debian:bookworm")
        made.append(high["id"])
        assert (high["vcpus"], high["mem_mib"], high["disk_mib"]) == (CPUS, 8192, 65536)
        low = create(c, name="0.dev_env-1", vcpus=1, mem_mib=64, disk_mib=64)
        made.append(low["id"])
        assert (low["vcpus"], low["mem_mib"], low["disk_mib"]) == (1, 64, 64)
        nulls = create(c, vcpus=None, mem_mib=None, disk_mib=None, image=None, snapshot_id=None)
        made.append(nulls["id"])
        assert (nulls["image"], nulls["vcpus"], nulls["mem_mib"], nulls["disk_mib"]) == (
            "debian:bookworm",
            1,
            1024,
            4096,
        )
        for vm_id in made:
            vm = wait_settled(c, vm_id)
            assert vm["status_detail"] == "ready", vm
    finally:
        for vm_id in made:
            dispose(c, vm_id)


# --- list: filters, sort, paging ----------------------------------------------------------------------------


def test_list_filters_sort_and_paging(alice: Account) -> None:
    c = alice.client
    tag = unique_name("page")
    letters = ["g", "c", "a", "f", "b", "e", "d"]  # creation order differs from name order
    made: list[dict[str, Any]] = []
    try:
        for letter in letters:
            made.append(create(c, name=f"{tag}-{letter}"))
        ids = [vm["id"] for vm in made]
        for vm_id in ids:
            assert wait_settled(c, vm_id)["status_detail"] == "ready"
        stopped_id, destroyed_id = ids[1], ids[4]
        assert c.post(f"/v1/vms/{stopped_id}/stop").status_code == 200
        assert c.post(f"/v1/vms/{destroyed_id}/stop").status_code == 200
        assert c.delete(f"/v1/vms/{destroyed_id}").status_code == 204
        running_ids = [i for i in ids if i not in (stopped_id, destroyed_id)]

        # filters
        assert set(listed_ids(c, status="running")) == set(running_ids)
        assert listed_ids(c, status="stopped") == [stopped_id]
        assert listed_ids(c, status="destroyed") == [destroyed_id]
        assert listed_ids(c, status="pending") == []
        assert listed_ids(c, status="failed") == []
        assert set(listed_ids(c, status_detail="ready")) == set(running_ids)
        assert listed_ids(c, status_detail="stopped") == [stopped_id]
        assert listed_ids(c, status_detail="destroyed") == [destroyed_id]
        for detail in ("queued", "creating", "starting", "running", "stopping", "destroying", "failed"):
            assert listed_ids(c, status_detail=detail) == [], detail
        assert listed_ids(c, status="running", status_detail="ready") == listed_ids(c, status="running")
        assert listed_ids(c, status="running", status_detail="stopped") == []
        assert listed_ids(c, name=f"{tag}-c") == [stopped_id]
        assert listed_ids(c, name=f"{tag}-b") == [destroyed_id]
        assert listed_ids(c, name=tag) == []  # exact match only
        assert listed_ids(c, name=f"{tag}-C") == []
        assert listed_ids(c, name=f"{tag}-%") == []
        for params in (
            {"status": "bogus"},
            {"status": "RUNNING"},
            {"status": "ready"},  # a status_detail value is not a status
            {"status": ""},
            {"status_detail": "bogus"},
            {"status_detail": "pending"},  # a status is not a status_detail value
            {"status_detail": "Ready"},
        ):
            error_of(c.get("/v1/vms", params=params), 400, "invalid_parameter")

        # sort and order
        everything = listed_ids(c)
        assert everything == ids[::-1]  # default: created_at desc
        assert listed_ids(c, sort="created_at") == ids[::-1]
        assert listed_ids(c, order="desc") == ids[::-1]
        assert listed_ids(c, sort="created_at", order="asc") == ids
        by_name = [vm["id"] for vm in sorted(made, key=lambda vm: vm["name"])]
        assert listed_ids(c, sort="name") == by_name[::-1]  # order defaults to desc for every sort
        assert listed_ids(c, sort="name", order="asc") == by_name
        asc = listing(c, limit=100, sort="updated_at", order="asc")["data"]
        stamps = [vm["updated_at"] for vm in asc]
        assert stamps == sorted(stamps)
        assert [vm["id"] for vm in asc][-2:] == [stopped_id, destroyed_id]  # the last two changed
        assert listed_ids(c, sort="updated_at", order="desc") == [vm["id"] for vm in asc][::-1]
        for params in ({"sort": "status"}, {"sort": "id"}, {"sort": ""}, {"order": "up"}, {"order": "ASC"}):
            error_of(c.get("/v1/vms", params=params), 400, "invalid_parameter")

        # paging: every VM exactly once, in the same order as one big page
        for sort in ("created_at", "updated_at", "name"):
            for order in ("asc", "desc"):
                paged, sizes = page_all(c, 3, sort=sort, order=order)
                assert paged == listed_ids(c, sort=sort, order=order), (sort, order)
                assert sizes == [3, 3, 1], (sort, order, sizes)
        paged, _ = page_all(c, 1)
        assert paged == ids[::-1]
        paged, sizes = page_all(c, 2, status="running")
        assert sorted(paged) == sorted(running_ids)
        assert sizes == [2, 2, 1]
        first = listing(c, limit=3, sort="name", order="asc")
        assert first["has_more"] is True
        assert isinstance(first["cursor"], str)
        # the cursor alone continues the listing with the sort and order it was issued for
        rest = listing(c, limit=100, cursor=first["cursor"])
        assert [vm["id"] for vm in first["data"] + rest["data"]] == by_name
        error_of(
            c.get("/v1/vms", params={"cursor": first["cursor"], "sort": "created_at"}), 400, "invalid_cursor"
        )
        error_of(c.get("/v1/vms", params={"cursor": first["cursor"], "order": "desc"}), 400, "invalid_cursor")
        error_of(c.get("/v1/vms", params={"cursor": "garbage"}), 400, "invalid_cursor")
        # limits
        assert len(listing(c)["data"]) == 7
        for bad in ("0", "-1", "101", "1000", "abc", "1.5", ""):
            error_of(c.get("/v1/vms", params={"limit": bad}), 400, "invalid_parameter")
    finally:
        for vm in made:
            dispose(c, vm["id"])


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"name": "a\x00b"}, id="name-nul"),
        pytest.param({"name": "n" * 5000}, id="name-5000-chars"),
        pytest.param({"name": "dév"}, id="name-unicode"),
        pytest.param({"name": ""}, id="name-empty"),
        pytest.param({"status": "running\x00"}, id="status-nul"),
        pytest.param({"cursor": "\x00"}, id="cursor-nul"),
    ],
)
def test_odd_list_filters_never_fail_the_server(alice: Account, params: dict[str, str]) -> None:
    """A filter value no VM can have finds nothing or is refused as a bad parameter, on every database
    (PostgreSQL refuses NUL in text, SQLite does not): never a 500."""
    resp = alice.client.get("/v1/vms", params=params)
    if resp.status_code == 400:
        code = resp.json()["error"]["code"]
        assert code in ("invalid_parameter", "invalid_cursor"), resp.text
        error_of(resp, 400, code)
    else:
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"data": [], "has_more": False, "cursor": None}


def test_list_limit_defaults_to_20_and_is_at_most_100(node: Server, alice: Account) -> None:
    """105 destroyed VMs written straight into the store (booting them would take minutes)."""
    engine = make_engine(node.database_url)
    start = datetime.now(UTC) - timedelta(hours=1)
    try:
        with transaction(session_factory(engine)) as session:
            for n in range(105):
                at = start + timedelta(seconds=n)
                session.add(
                    Vm(
                        id=new_id(Prefix.VM),
                        user_id=str(alice.user["id"]),
                        name=f"bulk-{n:03d}",
                        public_key=public_key(),
                        status_detail="destroyed",
                        image="debian:bookworm",
                        vcpus=1,
                        mem_mib=1024,
                        disk_mib=4096,
                        created_at=at,
                        updated_at=at,
                    )
                )
    finally:
        engine.dispose()
    c = alice.client
    default = listing(c)
    assert len(default["data"]) == 20
    assert default["has_more"] is True
    assert isinstance(default["cursor"], str)
    assert [vm["name"] for vm in default["data"]] == [f"bulk-{n:03d}" for n in range(104, 84, -1)]
    most = listing(c, limit=100)
    assert len(most["data"]) == 100
    assert most["has_more"] is True
    rest = listing(c, limit=100, cursor=most["cursor"])
    assert len(rest["data"]) == 5
    assert rest["has_more"] is False
    assert rest["cursor"] is None
    error_of(c.get("/v1/vms", params={"limit": 101}), 400, "invalid_parameter")
    paged, sizes = page_all(c, 20, status="destroyed", sort="name", order="asc")
    assert len(paged) == len(set(paged)) == 105
    assert sizes == [20] * 5 + [5]
    assert listed_ids(c, status="running") == []


# --- images -----------------------------------------------------------------------------------------------


def test_images_list_the_default_image(node: Server, alice: Account) -> None:
    resp = alice.client.get("/v1/images")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"data", "has_more", "cursor"}
    assert body["has_more"] is False
    assert body["cursor"] is None
    for image in body["data"]:
        assert set(image) == {"name", "size_bytes", "created_at", "source", "default"}, image
        assert is_int(image["size_bytes"])
        assert image["size_bytes"] > 0
        assert is_timestamp(image["created_at"])
        assert isinstance(image["source"], str)
    defaults = [image for image in body["data"] if image["default"] is True]
    assert [image["name"] for image in defaults] == ["debian:bookworm"]
    with node.client() as anon:
        error_of(anon.get("/v1/images"), 401, "unauthorized")
        error_of(anon.get("/v1/vms"), 401, "unauthorized")
        error_of(anon.post("/v1/vms", json={"name": "x", "public_key": public_key()}), 401, "unauthorized")


# --- exec contract ----------------------------------------------------------------------------------------


def run_exec(client: httpx.Client, vm_id: str, command: str | list[str], **fields: Any) -> dict[str, Any]:
    resp = client.post(f"/v1/vms/{vm_id}/exec", json={"command": command, **fields}, timeout=120)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    assert set(out) == EXEC_FIELDS, out
    assert is_int(out["exit_code"]), out
    assert is_int(out["duration_ms"]), out
    assert out["duration_ms"] >= 0, out
    assert isinstance(out["stdout"], str)
    assert isinstance(out["stderr"], str)
    for flag in ("stdout_truncated", "stderr_truncated", "timed_out"):
        assert isinstance(out[flag], bool), out
    return out


def test_exec_answer_shape_and_output_cap(resident: Resident) -> None:
    c, vm_id = resident.owner.client, resident.id
    out = run_exec(c, vm_id, "echo out; echo err >&2; exit 3")
    assert {k: v for k, v in out.items() if k != "duration_ms"} == {
        "exit_code": 3,
        "stdout": "out\n",
        "stderr": "err\n",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "timed_out": False,
    }
    argv = run_exec(c, vm_id, ["printf", "%s|", "a b", "$HOME"])
    assert argv["stdout"] == "a b|$HOME|"
    assert argv["exit_code"] == 0

    exact = run_exec(c, vm_id, f"head -c {MIB} /dev/zero | tr '\\0' a")
    assert len(exact["stdout"]) == MIB
    assert exact["stdout_truncated"] is False
    over = run_exec(c, vm_id, f"head -c {MIB + 1} /dev/zero | tr '\\0' b; exit 5")
    assert over["stdout"] == "b" * MIB
    assert over["stdout_truncated"] is True
    assert over["exit_code"] == 5
    assert over["stderr_truncated"] is False
    err = run_exec(c, vm_id, f"head -c {3 * MIB} /dev/zero | tr '\\0' e >&2; echo fine")
    assert err["stderr"] == "e" * MIB
    assert err["stderr_truncated"] is True
    assert err["stdout"] == "fine\n"
    assert err["stdout_truncated"] is False
    assert err["exit_code"] == 0

    slow = run_exec(c, vm_id, "sleep 30", timeout=0.5)
    assert slow["timed_out"] is True
    assert slow["exit_code"] == 124
    assert slow["duration_ms"] < 10_000
    assert run_exec(c, vm_id, "true", timeout=3600)["exit_code"] == 0
    assert run_exec(c, vm_id, "pwd", cwd="/tmp")["stdout"] == "/tmp\n"
    assert run_exec(c, vm_id, "id -u", user="nobody")["stdout"] == "65534\n"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"command": []}, id="command-empty-list"),
        pytest.param({"command": [""]}, id="command-empty-program"),
        pytest.param({}, id="command-missing"),
        pytest.param({"command": None}, id="command-null"),
        pytest.param({"command": 1}, id="command-int"),
        pytest.param({"command": [1]}, id="command-list-of-int"),
        pytest.param({"command": "true", "cwd": "tmp"}, id="cwd-relative"),
        pytest.param({"command": "true", "cwd": "./tmp"}, id="cwd-dot-relative"),
        pytest.param({"command": "true", "cwd": ""}, id="cwd-empty"),
        pytest.param({"command": "true", "user": "no-such-user"}, id="user-unknown"),
        pytest.param({"command": "true", "user": "99999999999999999999"}, id="user-huge-uid"),
        pytest.param({"command": "true", "timeout": 0}, id="timeout-0"),
        pytest.param({"command": "true", "timeout": -1}, id="timeout-negative"),
        pytest.param({"command": "true", "timeout": 3600.001}, id="timeout-over-3600"),
        pytest.param({"command": "true", "timeout": 3601}, id="timeout-3601"),
        pytest.param({"command": "true", "timeout": "10"}, id="timeout-string"),
        pytest.param({"command": "true", "env": {"1BAD": "x"}}, id="env-bad-key"),
        pytest.param({"command": "true", "unexpected": 1}, id="unknown-field"),
    ],
)
def test_exec_bad_requests(resident: Resident, body: dict[str, Any]) -> None:
    resp = resident.owner.client.post(f"/v1/vms/{resident.id}/exec", json=body)
    error_of(resp, 422, "validation_error")
