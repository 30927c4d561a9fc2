"""A sandbox's device nodes are its own (crun): /dev/null, zero, full, random, urandom and tty inside are nodes
the node made for that sandbox (same numbers as the host's), never binds of the host's inodes; they work as
devices do; a change of their attributes, even by host root acting on the bind source (what a compromised
host-side helper could do), leaves the host's devices and every other sandbox's as they were; they survive
hibernate/resume (CRIU finds the bind sources again) and go with the bundle."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Account, Server, signup
from tests.vmtools import create_ready, destroy, run

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# device (decimal), inode, major:minor (hex) and mode of each node, one line each
STAT_ALL = "stat -c '%n %d:%i %t:%T %a' " + " ".join(f"/dev/{d}" for d in DEVICES)
PTY_TTY = (
    "import os, pty\n"
    "pid, fd = pty.fork()\n"
    "if pid == 0:\n"
    "    t = os.open('/dev/tty', os.O_RDWR)\n"
    "    os.write(t, b'through-dev-tty')\n"
    "    os._exit(0)\n"
    "got = b''\n"
    "while b'through-dev-tty' not in got:\n"
    "    try:\n"
    "        chunk = os.read(fd, 100)\n"
    "    except OSError:\n"
    "        break\n"
    "    if not chunk:\n"
    "        break\n"
    "    got += chunk\n"
    "os.waitpid(pid, 0)\n"
    "print(got.decode())\n"
)

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def account(node: Server) -> Iterator[Account]:
    acct = signup(node)
    yield acct
    acct.client.close()


@pytest.fixture(scope="module")
def vms(account: Account) -> Iterator[list[dict[str, Any]]]:
    made = [create_ready(account.client), create_ready(account.client)]
    yield made
    for vm in made:
        destroy(account.client, vm["id"])


def inside(c: httpx.Client, vm_id: str) -> dict[str, tuple[tuple[int, int], str, str]]:
    """Each device as the sandbox sees it: ((st_dev, st_ino), major:minor in hex, mode in octal)."""
    out = run(c, vm_id, STAT_ALL)
    assert out["exit_code"] == 0, out
    seen: dict[str, tuple[tuple[int, int], str, str]] = {}
    for line in out["stdout"].splitlines():
        name, ident, numbers, mode = line.split()
        dev, ino = ident.split(":")
        seen[name.removeprefix("/dev/")] = ((int(dev), int(ino)), numbers, mode)
    assert set(seen) == set(DEVICES), out
    return seen


def host_identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def bind_sources(node: Server, vm_id: str) -> dict[str, str]:
    """The host file each /dev node of the sandbox is (its config.json): a bind of the node itself, or of a
    directory as /dev, or else what the runtime binds by itself in a user namespace, the host's node."""
    config = json.loads((node.data_dir / "node" / "bundles" / vm_id / "config.json").read_text())
    binds = {m["destination"]: m["source"] for m in config["mounts"] if m["type"] == "bind"}
    return {
        dev: binds.get(f"/dev/{dev}") or (f"{binds['/dev']}/{dev}" if "/dev" in binds else f"/dev/{dev}")
        for dev in DEVICES
    }


@pytest.fixture
def host_modes() -> Iterator[dict[str, int]]:
    """The host's device modes; put back after the test whatever it did."""
    before = {dev: os.stat(f"/dev/{dev}").st_mode for dev in DEVICES}
    yield before
    for dev, mode in before.items():
        if os.stat(f"/dev/{dev}").st_mode != mode:
            os.chmod(f"/dev/{dev}", stat.S_IMODE(mode))


def test_device_nodes_are_the_sandboxs_own_and_work(account: Account, vms: list[dict[str, Any]]) -> None:
    c = account.client
    first, second = (inside(c, vm["id"]) for vm in vms)
    for dev in DEVICES:
        host = os.stat(f"/dev/{dev}")
        ident, numbers, mode = first[dev]
        assert ident != (host.st_dev, host.st_ino), f"/dev/{dev} in the sandbox is the host's inode"
        assert numbers == f"{os.major(host.st_rdev):x}:{os.minor(host.st_rdev):x}", (dev, numbers)
        assert mode == "666", (dev, mode)
        assert ident != second[dev][0], f"two sandboxes share /dev/{dev}"
    script = (
        "echo x > /dev/null && test ! -s /dev/null && head -c 4 /dev/urandom | wc -c && "
        "head -c 4 /dev/random | wc -c && head -c 3 /dev/zero | od -An -tx1 && "
        "head -c 2 /dev/full | od -An -tx1; echo x > /dev/full"
    )
    out = run(c, vms[0]["id"], ["bash", "-c", script])  # bash names the error (ENOSPC)
    assert out["stdout"].split() == ["4", "4", "00", "00", "00", "00", "00"], out
    assert "No space left on device" in out["stderr"], out
    assert out["exit_code"] != 0
    # /dev/tty is the controlling terminal, as with the host's node
    tty = run(c, vms[0]["id"], ["python3", "-c", PTY_TTY])
    assert tty["exit_code"] == 0, tty
    assert "through-dev-tty" in tty["stdout"], tty
    assert run(c, vms[0]["id"], "echo x > /dev/tty")["exit_code"] != 0  # no terminal: ENXIO, as before


def test_a_change_of_the_bind_source_never_reaches_the_host_or_another_sandbox(
    node: Server, account: Account, vms: list[dict[str, Any]], host_modes: dict[str, int]
) -> None:
    c = account.client
    sources = bind_sources(node, vms[0]["id"])
    assert set(sources) == set(DEVICES)
    seen = inside(c, vms[0]["id"])
    other_before = inside(c, vms[1]["id"])
    for dev, source in sources.items():
        # the sandbox's node is the bind source, and the source is not the host's device
        assert host_identity(source) == seen[dev][0], (dev, source)
        assert host_identity(source) != host_identity(f"/dev/{dev}"), f"{source} is the host's /dev/{dev}"
    try:
        # what a compromised host-side helper acting on the sandbox's nodes could do (the group's rights go;
        # the sandbox's processes, "others" to the nodes' owner, keep theirs, so it can still be asked)
        for source in sources.values():
            os.chmod(source, 0o606)  # noqa: S103 (narrower than the nodes' 0666)
        assert {dev: m for dev, (_, _, m) in inside(c, vms[0]["id"]).items()} == dict.fromkeys(DEVICES, "606")
        assert {dev: os.stat(f"/dev/{dev}").st_mode for dev in DEVICES} == host_modes
        assert inside(c, vms[1]["id"]) == other_before
    finally:
        for source in sources.values():
            os.chmod(source, 0o666)  # noqa: S103 (as they were: device nodes for everyone)


def test_hibernate_and_resume_keep_private_working_devices(node: Server, account: Account) -> None:
    c = account.client
    vm = create_ready(c, mem_mib=256)
    try:
        # a process holding /dev/null and /dev/urandom open across the checkpoint
        held = "nohup sh -c 'exec 3</dev/urandom; while :; do head -c 1 <&3 >/dev/null; sleep 0.05; done'"
        assert run(c, vm["id"], f"{held} >/dev/null 2>&1 &")["exit_code"] == 0
        assert c.post(f"/v1/vms/{vm['id']}/hibernate").status_code == 200
        bundle = node.data_dir / "node" / "bundles" / vm["id"]
        assert not bundle.exists()
        assert not [
            line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(bundle) in line
        ]
        r = c.post(f"/v1/vms/{vm['id']}/resume")
        assert r.status_code == 200, r.text
        seen = inside(c, vm["id"])
        sources = bind_sources(node, vm["id"])
        for dev in DEVICES:
            assert seen[dev][0] == host_identity(sources[dev]) != host_identity(f"/dev/{dev}"), dev
        assert run(c, vm["id"], "pgrep -f 'exec 3</dev/urandom' >/dev/null")["exit_code"] == 0
        out = run(c, vm["id"], "echo x > /dev/null && head -c 4 /dev/urandom | wc -c")
        assert out["stdout"].strip() == "4", out
    finally:
        destroy(c, vm["id"])
    bundle = node.data_dir / "node" / "bundles" / vm["id"]
    assert not bundle.exists()
    assert not [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(bundle) in line]
