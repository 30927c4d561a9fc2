"""Helpers for tests that drive real sandboxes through the API."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from corral.runtime import cgroups

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


def wait_detail(
    client: httpx.Client, vm_id: str, *, until: tuple[str, ...] = ("ready", "failed"), timeout: float = 60.0
) -> dict[str, Any]:
    """Like ``wait_status``, on ``status_detail`` (a VM is ``running``/``running`` for a moment before it is
    ``running``/``ready``)."""
    deadline = time.monotonic() + timeout
    while True:
        vm: dict[str, Any] = client.get(f"/v1/vms/{vm_id}").json()
        if vm["status_detail"] in until or time.monotonic() > deadline:
            return vm
        time.sleep(0.02)


def create_ready(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    """Create a VM and wait until it is ready; fails the test if it does not get there."""
    body = {"name": unique_name(), "public_key": public_key(), **fields}
    resp = client.post("/v1/vms", json=body)
    assert resp.status_code == 201, resp.text
    vm = wait_detail(client, resp.json()["id"])
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


# ---- what a node has on this host -------------------------------------------------------------------------

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_hierarchies() -> list[Path]:
    if (CGROUP_ROOT / "cgroup.controllers").exists():  # pure v2: one tree
        return [CGROUP_ROOT]
    return sorted(p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink() and p.is_mount())


def v1_hierarchy_of(controller: str) -> str | None:
    """The v1 hierarchy id the kernel has ``controller`` in (``"0"``: none, it is in the unified tree)."""
    return cgroups.v1_hierarchies(Path("/proc/cgroups").read_text()).get(controller)


@contextlib.contextmanager
def spare_v1_mount(controller: str) -> Iterator[Path]:
    """``controller``'s v1 hierarchy mounted at a place of its own (the kernel's kept one, if it has one),
    unmounted afterwards."""
    spare = Path(tempfile.mkdtemp(prefix=f"corral-{controller}-"))
    try:
        cgroups.mount_v1(controller, spare)
        try:
            yield spare
        finally:
            subprocess.run(["umount", str(spare)], check=True)
    finally:
        spare.rmdir()


def unmount_v1(controller: str, timeout: float = 10.0) -> None:
    """Unmount ``controller``'s v1 hierarchy at ``CGROUP_ROOT/<controller>`` and see the kernel let it go.

    A hierarchy unmounted while it still has children (cgroups removed but not yet freed count) is kept,
    unmounted, and let go only by a later mount and unmount of it when it has none: CRIU does that when it
    dumps or restores, and every boot after it fails on a node that relied on the hierarchy. So this mounts
    it again elsewhere and unmounts it until the kernel hands the controller back to the unified tree."""
    subprocess.run(["umount", str(CGROUP_ROOT / controller)], check=True)
    deadline = time.monotonic() + timeout
    while v1_hierarchy_of(controller) not in ("0", None):
        assert time.monotonic() < deadline, f"the kernel keeps the {controller} hierarchy"
        time.sleep(0.05)
        if v1_hierarchy_of(controller) not in ("0", None):
            with spare_v1_mount(controller):
                pass


def cgroup_parents(node_id: str) -> list[Path]:
    """The node's parent cgroup (``corral-<node id>``) in every hierarchy where it exists."""
    return [h / f"corral-{node_id}" for h in _cgroup_hierarchies() if (h / f"corral-{node_id}").is_dir()]


def host_leftovers(node_root: Path, node_id: str) -> dict[str, set[str]]:
    """What exists on the host for the node at ``node_root`` (``<data_dir>/node``), as container ids by
    kind: runtime containers, mounts under the bundles dir, cgroups, disk subvolumes, bundle dirs, and
    processes (in the node's cgroups, or rooted in a bundle)."""
    found: dict[str, set[str]] = {
        "containers": set(),
        "mounts": set(),
        "cgroups": set(),
        "volumes": set(),
        "bundles": set(),
        "processes": set(),
    }
    listed = subprocess.run(
        ["crun", "--root", str(node_root / "state"), "list", "--quiet"], capture_output=True, text=True
    )
    if listed.returncode == 0:
        found["containers"] = {line.strip() for line in listed.stdout.splitlines() if line.strip()}
    bundles = node_root / "bundles"
    prefix = f"{bundles}/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                found["mounts"].add(point.removeprefix(prefix).split("/")[0])
    for parent in cgroup_parents(node_id):
        found["cgroups"].update(p.name for p in parent.iterdir() if p.is_dir())
    vols = node_root / "disk" / "vols"
    if vols.is_dir():
        found["volumes"] = {p.name for p in vols.iterdir()}
    if bundles.is_dir():
        found["bundles"] = {p.name for p in bundles.iterdir()}
    found["processes"] = set(node_processes(node_root, node_id).values())
    return found


def node_processes(node_root: Path, node_id: str) -> dict[int, str]:
    """Every process on the host that belongs to a sandbox of this node: in one of its cgroups, or with
    its root inside one of its bundles. PID -> container id."""
    marker = f"/corral-{node_id}/"
    prefix = f"{node_root / 'bundles'}/"
    procs: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroup = (entry / "cgroup").read_text()
            root = os.readlink(entry / "root")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        for line in cgroup.splitlines():
            _, sep, path = line.partition(marker)
            if sep or line.endswith(marker.rstrip("/")):
                procs[int(entry.name)] = path.split("/")[0] or "(the node's parent cgroup)"
                break
        else:
            if root.startswith(prefix):
                procs[int(entry.name)] = root.removeprefix(prefix).split("/")[0]
    return procs


def sandbox_pid_of(node_root: Path, node_id: str, cid: str, cmdline: str) -> int | None:
    """The host PID of the process of sandbox ``cid`` whose command line (space-separated) is ``cmdline``."""
    for pid, owner in node_processes(node_root, node_id).items():
        if owner != cid:
            continue
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        if b" ".join(args).decode(errors="replace") == cmdline:
            return pid
    return None


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}
