"""Images imported from files, and runc as the selectable runtime, on the real kernel."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import IMAGES_DIR, Account, Server, node_server, signup
from tests.vmtools import create_ready, destroy, run

BUSYBOX = Path("/bin/busybox")


def _layer(files: dict[str, bytes | str]) -> bytes:
    """A tar layer: bytes are files (mode 0755), str values are symlink targets."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "etc", "root", "tmp"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type = tarfile.SYMTYPE
                info.linkname = content
                tar.addfile(info)
            else:
                info.size = len(content)
                info.mode = 0o755
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def docker_save_tarball(path: Path, tag: str) -> None:
    """A `docker save` tarball of a busybox image with a config (Env, Cmd)."""
    layer = _layer(
        {
            "bin/busybox": BUSYBOX.read_bytes(),
            "bin/sh": "busybox",
            "bin/echo": "busybox",
            "bin/cat": "busybox",
            "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
            "etc/motd": b"imported image\n",
        }
    )
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["IMAGE_VAR=from-config"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [tag], "Layers": ["layer0/layer.tar"]}]
    ).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in (("layer0/layer.tar", layer), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def corral(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_DATA_DIR": str(data_dir), "CORRAL_IMAGES_DIR": str(IMAGES_DIR)}
    return subprocess.run(
        [sys.executable, "-m", "corral", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def imported(tmp_path: Path, node: Server) -> Iterator[str]:
    name = f"test/busybox:{secrets.token_hex(3)}"
    tarball = tmp_path / "busybox.tar"
    docker_save_tarball(tarball, name)
    done = corral("image", "import", str(tarball), "--name", name, data_dir=node.data_dir)
    assert done.returncode == 0, done.stderr
    yield name
    assert corral("image", "rm", name, data_dir=node.data_dir).returncode == 0


def test_imported_image_boots_and_is_listed(imported: str, owner: Account) -> None:
    c = owner.client
    listed = {i["name"]: i for i in c.get("/v1/images").json()["data"]}
    assert imported in listed
    assert listed[imported]["default"] is False
    assert listed["debian:bookworm"]["default"] is True
    listing = corral("image", "list", data_dir=Path("/nonexistent-unused"))
    assert imported in listing.stdout
    vm = create_ready(c, image=imported)
    try:
        assert vm["image"] == imported
        out = run(c, vm["id"], ["/bin/cat", "/etc/motd"])
        assert out == {**out, "exit_code": 0, "stdout": "imported image\n"}
        shell = run(c, vm["id"], "echo $((40+2)); grep Seccomp: /proc/self/status")
        assert shell["stdout"] == "42\nSeccomp:\t2\n"
        # the sandbox's root owns the image's files (they were shifted into its id range at import)
        own = run(c, vm["id"], ["/bin/busybox", "stat", "-c", "%u", "/etc/motd"])
        assert own["stdout"] == "0\n"
    finally:
        destroy(c, vm["id"])


def test_unknown_image_says_how_to_get_it(owner: Account) -> None:
    resp = owner.client.post("/v1/vms", json={"name": "x", "public_key": _key(), "image": "nope/missing:1"})
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert err["code"] == "image_not_found"
    assert "corral image build" in err["message"]
    assert "corral image import" in err["message"]


def _key() -> str:
    from tests.vmtools import public_key

    return public_key()


def test_runc_is_selectable(tmp_path: Path) -> None:
    with node_server(tmp_path, CORRAL_RUNTIME="runc") as srv:
        acct = signup(srv)
        c = acct.client
        vm = create_ready(c)
        try:
            out = run(
                c, vm["id"], "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; cat /proc/self/uid_map"
            )
            lines = out["stdout"].split("\n")
            assert lines[0] == "NoNewPrivs:\t1"
            assert lines[1] == "Seccomp:\t2"
            assert lines[2].split() == ["0", "100000", "65536"]
            assert run(c, vm["id"], "echo hi > /root/f")["exit_code"] == 0
            assert c.post(f"/v1/vms/{vm['id']}/stop").json()["status"] == "stopped"
            assert c.post(f"/v1/vms/{vm['id']}/start").json()["status"] == "running"
            assert run(c, vm["id"], "cat /root/f")["stdout"] == "hi\n"
        finally:
            destroy(c, vm["id"])
            c.close()
        state = srv.data_dir / "node" / "state"
        assert (
            subprocess.run(
                ["runc", "--root", str(state), "list", "-q"], capture_output=True, text=True
            ).stdout.strip()
            == ""
        )
