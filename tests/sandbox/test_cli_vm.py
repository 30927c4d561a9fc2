"""`corral vm ...` against a live server: the CLI as a user runs it (a subprocess with CORRAL_URL/API_KEY)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import Account, Server
from tests.vmtools import _KEY_DIR, public_key, unique_name


def cli(
    node: Server, account: Account, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CORRAL_URL": node.url,
        "CORRAL_API_KEY": account.token,
        "HOME": str(cwd or Path.cwd()),
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "corral", "vm", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_vm_commands_end_to_end(node: Server, owner: Account, tmp_path: Path) -> None:
    public_key()
    name = unique_name("cli")
    made = cli(
        node, owner, "create", name, "--public-key", str(_KEY_DIR / "id_ed25519.pub"), "--timeout", "600"
    )
    assert made.returncode == 0, made.stderr
    vm = json.loads(made.stdout)
    assert (vm["name"], vm["status"], vm["status_detail"]) == (name, "running", "ready")

    listed = cli(node, owner, "list")
    assert name in listed.stdout
    assert vm["id"] in listed.stdout
    got = json.loads(cli(node, owner, "get", name).stdout)
    assert got["id"] == vm["id"]

    # exec streams output and exits with the command's code
    ran = cli(node, owner, "exec", name, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert ran.returncode == 3
    assert ran.stdout == "out\n"
    assert "err\n" in ran.stderr

    # cp in and out, by name
    local = tmp_path / "in.bin"
    local.write_bytes(bytes(range(256)) * 100)
    local.chmod(0o640)
    put = cli(node, owner, "cp", str(local), f"{name}:/root/in.bin")
    assert put.returncode == 0, put.stderr
    mode = cli(node, owner, "exec", name, "--", "stat", "-c", "%a %s", "/root/in.bin")
    assert mode.stdout == "640 25600\n"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    got_back = cli(node, owner, "cp", f"{name}:/root/in.bin", str(out_dir))
    assert got_back.returncode == 0, got_back.stderr
    assert (out_dir / "in.bin").read_bytes() == local.read_bytes()

    refused = cli(node, owner, "destroy", vm["id"])  # still running
    assert refused.returncode == 1
    assert "vm_not_stopped" in refused.stderr
    stopped = json.loads(cli(node, owner, "stop", name).stdout)
    assert stopped["status"] == "stopped"
    started = json.loads(cli(node, owner, "start", name).stdout)
    assert started["status"] == "running"
    assert cli(node, owner, "exec", name, "--", "cat", "/root/in.bin").returncode == 0

    # the auto-destroy timer: set, then reset
    kept = json.loads(cli(node, owner, "keep", name, "--timeout", "3600").stdout)
    assert kept["timeout"] == 3600
    assert kept["expires_at"] is not None

    gone = cli(node, owner, "destroy", name, "--force")
    assert gone.returncode == 0, gone.stderr
    assert owner.client.get(f"/v1/vms/{vm['id']}").json()["status"] == "destroyed"
    assert vm["id"] in cli(node, owner, "history").stdout
    assert name not in cli(node, owner, "list").stdout
    missing = cli(node, owner, "get", name)
    assert missing.returncode == 1
    assert f"No VM named {name}" in missing.stderr


def test_state_commands_end_to_end(node: Server, owner: Account, tmp_path: Path) -> None:
    """hibernate, resume, checkpoint, rollback, fork, snapshot and create --snapshot from the CLI."""
    public_key()
    name = unique_name("cli")
    made: list[str] = []
    try:
        vm = json.loads(
            cli(node, owner, "create", name, "--public-key", str(_KEY_DIR / "id_ed25519.pub")).stdout
        )
        made.append(vm["id"])
        assert cli(node, owner, "exec", name, "--", "sh", "-c", "echo one > /root/f").returncode == 0

        slept = cli(node, owner, "hibernate", name)
        assert json.loads(slept.stdout)["status_detail"] == "hibernated", slept.stderr
        woke = cli(node, owner, "resume", name)
        assert json.loads(woke.stdout)["status_detail"] == "ready", woke.stderr

        taken = cli(node, owner, "checkpoint", name, "before")
        assert json.loads(taken.stdout)["name"] == "before", taken.stderr
        assert cli(node, owner, "exec", name, "--", "sh", "-c", "echo two > /root/f").returncode == 0
        back = cli(node, owner, "rollback", name, "before")
        assert back.returncode == 0, back.stderr
        assert cli(node, owner, "exec", name, "--", "cat", "/root/f").stdout == "one\n"
        assert "No checkpoint named nope" in cli(node, owner, "rollback", name, "nope").stderr

        kids = json.loads(cli(node, owner, "fork", name, "--count", "2").stdout)
        made += [k["id"] for k in kids]
        assert [k["status_detail"] for k in kids] == ["ready", "ready"]
        assert cli(node, owner, "exec", kids[0]["id"], "--", "cat", "/root/f").stdout == "one\n"

        snap = json.loads(cli(node, owner, "snapshot", name, "--label", "cli").stdout)
        assert (snap["status"], snap["label"]) == ("ready", "cli")
        twin = cli(node, owner, "create", unique_name("cli"), "--snapshot", snap["id"],
                   "--public-key", str(_KEY_DIR / "id_ed25519.pub"))  # fmt: skip
        assert twin.returncode == 0, twin.stderr
        made.append(json.loads(twin.stdout)["id"])
        assert cli(node, owner, "exec", made[-1], "--", "cat", "/root/f").stdout == "one\n"
        owner.client.delete(f"/v1/snapshots/{snap['id']}")
    finally:
        for vm_id in made:
            cli(node, owner, "destroy", vm_id, "--force")
