"""Helpers for tests that drive real sandboxes through the API."""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

_KEY_DIR = Path(__file__).resolve().parent.parent / ".cache" / "test-keys"


def public_key() -> str:
    """An ed25519 public key made with OpenSSH's ssh-keygen (kept in .cache for the whole run)."""
    _KEY_DIR.mkdir(parents=True, exist_ok=True)
    key = _KEY_DIR / "id_ed25519"
    if not key.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "corral-test", "-f", str(key)], check=True
        )
    return key.with_suffix(".pub").read_text().strip()


def unique_name(prefix: str = "vm") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def wait_status(
    client: httpx.Client, vm_id: str, *, until: tuple[str, ...] = ("running", "failed"), timeout: float = 60.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        vm: dict[str, Any] = client.get(f"/v1/vms/{vm_id}").json()
        if vm["status"] in until or time.monotonic() > deadline:
            return vm
        time.sleep(0.02)


def create_ready(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    """Create a VM and wait until it is ready; fails the test if it does not get there."""
    body = {"name": unique_name(), "public_key": public_key(), **fields}
    resp = client.post("/v1/vms", json=body)
    assert resp.status_code == 201, resp.text
    vm = wait_status(client, resp.json()["id"])
    assert vm["status_detail"] == "ready", vm
    return vm


def destroy(client: httpx.Client, vm_id: str) -> None:
    """Stop (if needed) and destroy a VM."""
    vm = client.get(f"/v1/vms/{vm_id}").json()
    if vm.get("status") == "running":
        assert client.post(f"/v1/vms/{vm_id}/stop").status_code == 200
    if vm.get("status") != "destroyed":
        resp = client.delete(f"/v1/vms/{vm_id}")
        assert resp.status_code == 204, resp.text


def run(client: httpx.Client, vm_id: str, command: str | list[str], **fields: Any) -> dict[str, Any]:
    resp = client.post(f"/v1/vms/{vm_id}/exec", json={"command": command, **fields}, timeout=120)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out
