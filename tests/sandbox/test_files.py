"""Files in real sandboxes through the API: upload, download and listing, streaming, the disk quota, and
above all confinement: ``..``, absolute symlinks and links pointing out must resolve inside the sandbox,
never on the host."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Account
from tests.vmtools import create_ready, destroy, run

MIB = 1024 * 1024
BIG_TIMEOUT = 300.0


# ---- helpers ------------------------------------------------------------------------------------------------


@pytest.fixture
def vm(owner: Account) -> Iterator[str]:
    """A ready VM of ``owner``'s, destroyed afterwards whatever the test did."""
    vm_id = create_ready(owner.client)["id"]
    try:
        yield vm_id
    finally:
        destroy(owner.client, vm_id)


def upload(
    c: httpx.Client, vm_id: str, path: str, content: bytes | Iterable[bytes], **params: str
) -> httpx.Response:
    return c.post(
        f"/v1/vms/{vm_id}/files/upload",
        params={"path": path, **params},
        content=content,
        timeout=BIG_TIMEOUT,
    )


def download(c: httpx.Client, vm_id: str, path: str) -> httpx.Response:
    return c.get(f"/v1/vms/{vm_id}/files/download", params={"path": path})


def listing(c: httpx.Client, vm_id: str, path: str) -> httpx.Response:
    return c.get(f"/v1/vms/{vm_id}/files", params={"path": path})


def names(c: httpx.Client, vm_id: str, path: str) -> list[str]:
    resp = listing(c, vm_id, path)
    assert resp.status_code == 200, resp.text
    return [e["name"] for e in resp.json()["data"]]


def sh(c: httpx.Client, vm_id: str, command: str) -> str:
    """Run ``command`` in the sandbox, which must succeed; its stdout."""
    out = run(c, vm_id, command)
    assert out["exit_code"] == 0, out
    stdout: str = out["stdout"]
    return stdout


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """``resp`` is the API's error envelope with this status (and code)."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert isinstance(error.get("code"), str), body
    assert isinstance(error.get("message"), str), body
    assert error["message"], body
    if code is not None:
        assert error["code"] == code, body
    return error


def random_chunks(total: int, digest: Any, chunk: int = MIB) -> Iterator[bytes]:
    """``total`` random bytes in chunks, hashed into ``digest`` as they are produced."""
    left = total
    while left:
        data = os.urandom(min(chunk, left))
        digest.update(data)
        left -= len(data)
        yield data


def every_byte() -> bytes:
    return bytes(range(256)) * 1024 + bytes(reversed(range(256))) + b"\x00\r\n\x1a\xff"


# ---- upload and download -----------------------------------------------------------------------------------


def test_round_trip_keeps_every_byte_the_mode_and_root_ownership(owner: Account, vm: str) -> None:
    c = owner.client
    data = every_byte()
    resp = upload(c, vm, "/root/data.bin", data, mode="0755")
    assert resp.status_code == 201, resp.text
    assert resp.json() == {"path": "/root/data.bin", "size": len(data)}

    got = download(c, vm, "/root/data.bin")
    assert got.status_code == 200, got.text
    assert got.content == data
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-length"] == str(len(data))
    assert 'filename="data.bin"' in got.headers["content-disposition"]

    inside = sh(c, vm, "stat -c '%a %u %g %s' /root/data.bin; sha256sum /root/data.bin")
    stat_line, sum_line = inside.splitlines()
    assert stat_line == f"755 0 0 {len(data)}"
    assert sum_line.split()[0] == hashlib.sha256(data).hexdigest()

    # the default mode is 0644, and an empty body makes an empty file
    assert upload(c, vm, "/root/empty", b"").status_code == 201
    assert sh(c, vm, "stat -c '%a %u %s' /root/empty").strip() == "644 0 0"
    assert download(c, vm, "/root/empty").content == b""
    # a relative path is taken from /
    assert upload(c, vm, "root/relative.txt", b"rel").json()["path"] == "/root/relative.txt"
    assert sh(c, vm, "cat /root/relative.txt") == "rel"


def test_parents_are_created_unless_parents_false(owner: Account, vm: str) -> None:
    c = owner.client
    deep = "/root/a/b/c/d/e/file.txt"
    resp = upload(c, vm, deep, b"deep")
    assert resp.status_code == 201, resp.text
    assert sh(c, vm, f"cat {deep}") == "deep"
    assert sh(c, vm, "stat -c '%F %u %g' /root/a /root/a/b/c/d/e").splitlines() == ["directory 0 0"] * 2

    missing = upload(c, vm, "/root/missing-parent/x.txt", b"no", parents="false")
    assert_error(missing, 404, "file_not_found")
    assert "missing-parent" not in names(c, vm, "/root")

    # parents=false into an existing directory is fine
    assert upload(c, vm, "/root/a/flat.txt", b"flat", parents="false").status_code == 201
    assert sh(c, vm, "cat /root/a/flat.txt") == "flat"

    # a parent that is a file is not a directory, with or without parents
    assert upload(c, vm, "/root/plain", b"file").status_code == 201
    assert_error(upload(c, vm, "/root/plain/child", b"x"), 409, "not_a_directory")
    assert_error(upload(c, vm, "/root/plain/child", b"x", parents="false"), 409, "not_a_directory")


def test_upload_replaces_a_file_and_refuses_a_directory(owner: Account, vm: str) -> None:
    c = owner.client
    assert upload(c, vm, "/root/f.txt", b"first version, longer").status_code == 201
    resp = upload(c, vm, "/root/f.txt", b"second", mode="0600")
    assert resp.status_code == 201, resp.text
    assert resp.json()["size"] == 6
    assert download(c, vm, "/root/f.txt").content == b"second"
    assert sh(c, vm, "cat /root/f.txt; echo; stat -c %a /root/f.txt") == "second\n600\n"

    # a file made inside is replaced too
    sh(c, vm, "echo made-inside > /root/g.txt")
    assert upload(c, vm, "/root/g.txt", b"replaced").status_code == 201
    assert sh(c, vm, "cat /root/g.txt") == "replaced"

    sh(c, vm, "mkdir -p /root/adir && echo keep > /root/adir/inner")
    assert_error(upload(c, vm, "/root/adir", b"x"), 409, "is_a_directory")
    assert_error(upload(c, vm, "/root", b"x"), 409, "is_a_directory")
    assert sh(c, vm, "test -d /root/adir && cat /root/adir/inner") == "keep\n"
    assert names(c, vm, "/root/adir") == ["inner"]  # no temporary file left behind


def test_exec_and_files_share_the_sandbox_filesystem(owner: Account, vm: str) -> None:
    c = owner.client
    token = secrets.token_hex(6)
    sh(c, vm, f"printf 'from exec {token}' > /root/exec.txt; printf tmp-{token} > /tmp/exec-tmp.txt")
    assert download(c, vm, "/root/exec.txt").content == f"from exec {token}".encode()
    assert download(c, vm, "/tmp/exec-tmp.txt").content == f"tmp-{token}".encode()

    assert upload(c, vm, f"/tmp/up-{token}.txt", f"tmp upload {token}".encode()).status_code == 201
    assert sh(c, vm, f"cat /tmp/up-{token}.txt") == f"tmp upload {token}"
    assert not Path(f"/tmp/up-{token}.txt").exists()  # the host's /tmp is not the sandbox's


def test_dev_shm_is_the_sandboxs_own_tmpfs(owner: Account, vm: str) -> None:
    """/dev/shm is a tmpfs mounted inside the sandbox: files moving both ways there prove the files API goes
    through the sandbox's own mount namespace, not the root filesystem's directory on the host."""
    c = owner.client
    token = secrets.token_hex(6)
    assert sh(c, vm, "stat -f -c %T /dev/shm").strip() == "tmpfs"
    sh(c, vm, f"printf back > /dev/shm/exec-{token}")
    assert download(c, vm, f"/dev/shm/exec-{token}").content == b"back"
    assert f"exec-{token}" in names(c, vm, "/dev/shm")
    assert not Path(f"/dev/shm/exec-{token}").exists()

    resp = upload(c, vm, f"/dev/shm/shm-{token}", f"shm {token}".encode())
    assert resp.status_code == 201, resp.text
    assert sh(c, vm, f"cat /dev/shm/shm-{token}; stat -c ' %u %g %a' /dev/shm/shm-{token}") == (
        f"shm {token} 0 0 644\n"
    )
    assert not Path(f"/dev/shm/shm-{token}").exists()


def test_large_upload_and_download_are_streamed(owner: Account, vm: str) -> None:
    c = owner.client
    size = 64 * MIB
    sent = hashlib.sha256()
    request = c.build_request(
        "POST",
        f"/v1/vms/{vm}/files/upload",
        params={"path": "/root/big.bin"},
        content=random_chunks(size, sent),
        timeout=BIG_TIMEOUT,
    )
    assert "content-length" not in request.headers  # chunked: past the 1 MiB limit of the other endpoints
    assert request.headers["transfer-encoding"] == "chunked"
    resp = c.send(request)
    assert resp.status_code == 201, resp.text
    assert resp.json() == {"path": "/root/big.bin", "size": size}
    assert sh(c, vm, "sha256sum /root/big.bin").split()[0] == sent.hexdigest()

    received = hashlib.sha256()
    count = 0
    with c.stream(
        "GET", f"/v1/vms/{vm}/files/download", params={"path": "/root/big.bin"}, timeout=BIG_TIMEOUT
    ) as got:
        assert got.status_code == 200
        assert got.headers["content-length"] == str(size)
        for chunk in got.iter_bytes():
            received.update(chunk)
            count += len(chunk)
    assert count == size
    assert received.hexdigest() == sent.hexdigest()

    # the 1 MiB body limit still holds elsewhere
    too_big = c.post(f"/v1/vms/{vm}/exec", json={"command": "true", "env": {"X": "y" * (2 * MIB)}})
    assert_error(too_big, 400, "request_too_large")


# ---- listing ------------------------------------------------------------------------------------------------


def test_listing_reports_entries_sorted_by_name(owner: Account, vm: str) -> None:
    c = owner.client
    sh(
        c,
        vm,
        "mkdir -p /root/ls/sub && cd /root/ls && printf hello > b-file.txt && chmod 600 b-file.txt"
        " && printf '#!/bin/sh\\n' > a-script.sh && chmod 755 a-script.sh && chmod 750 sub"
        " && ln -s b-file.txt c-link && mkfifo d-fifo && touch -h -d @1700000000 b-file.txt",
    )
    resp = listing(c, vm, "/root/ls")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["path"] == "/root/ls"
    entries = {e["name"]: e for e in body["data"]}
    assert [e["name"] for e in body["data"]] == ["a-script.sh", "b-file.txt", "c-link", "d-fifo", "sub"]
    assert {n: e["type"] for n, e in entries.items()} == {
        "a-script.sh": "file",
        "b-file.txt": "file",
        "c-link": "symlink",
        "d-fifo": "other",
        "sub": "directory",
    }
    assert entries["b-file.txt"]["size"] == 5
    assert entries["a-script.sh"]["size"] == 10
    assert entries["c-link"]["size"] == len("b-file.txt")  # the link itself, not its target
    assert isinstance(entries["sub"]["size"], int)
    assert entries["b-file.txt"]["mode"] == "0600"
    assert entries["a-script.sh"]["mode"] == "0755"
    assert entries["sub"]["mode"] == "0750"
    assert entries["c-link"]["mode"] == "0777"
    assert datetime.fromisoformat(entries["b-file.txt"]["mtime"]) == datetime.fromtimestamp(1700000000, UTC)

    root = {e["name"]: e for e in listing(c, vm, "/").json()["data"]}
    assert root["tmp"]["type"] == "directory"
    assert root["tmp"]["mode"] == "1777"
    assert {"etc", "root", "usr", "proc"} <= set(root)
    default = c.get(f"/v1/vms/{vm}/files")  # no path: the root
    assert default.status_code == 200
    assert default.json()["path"] == "/"
    assert [e["name"] for e in default.json()["data"]] == sorted(root)
    assert listing(c, vm, "root/ls").json()["path"] == "/root/ls"
    assert names(c, vm, "/root/ls/sub") == []

    assert_error(listing(c, vm, "/root/ls/b-file.txt"), 409, "not_a_directory")
    assert_error(listing(c, vm, "/root/ls/missing"), 404, "file_not_found")
    assert_error(listing(c, vm, "/root/nowhere/deeper"), 404, "file_not_found")


# ---- confinement --------------------------------------------------------------------------------------------


@pytest.fixture
def host_marker() -> Iterator[tuple[Path, bytes]]:
    """A directory in the host's /tmp holding a file with unique content; removed afterwards."""
    directory = Path(f"/tmp/corral-host-marker-{secrets.token_hex(6)}")
    directory.mkdir()
    content = f"host secret {secrets.token_hex(16)}\n".encode()
    marker = directory / "marker.txt"
    marker.write_bytes(content)
    try:
        yield marker, content
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _escape_links(c: httpx.Client, vm_id: str) -> str:
    """Give the sandbox its own /etc/hostname (the image's copies the build host's) and links that point
    out; returns the sandbox's /etc/hostname content as ``cat`` sees it."""
    own = f"sandbox-{secrets.token_hex(8)}"
    sh(
        c,
        vm_id,
        f"echo {own} > /etc/hostname && ln -s / /root/rootlink && ln -s ../../../../../../etc /root/up"
        " && ln -s ../../../../../../.. /root/uproot && ln -s /proc/1/root /root/p1"
        " && ln -s /proc/self/root /root/selfroot",
    )
    linked = run(c, vm_id, "ln /etc/hostname /root/hardlink")  # may or may not be allowed: both are fine
    if linked["exit_code"] != 0:
        assert "hardlink" not in names(c, vm_id, "/root")
    return sh(c, vm_id, "cat /etc/hostname")


def test_downloads_and_listings_never_leave_the_sandbox(
    owner: Account, vm: str, host_marker: tuple[Path, bytes]
) -> None:
    c = owner.client
    marker, secret = host_marker
    host_hostname = Path("/etc/hostname").read_bytes()
    sandbox_hostname = _escape_links(c, vm).encode()
    assert sandbox_hostname != host_hostname

    def assert_sandbox_hostname(path: str) -> None:
        got = download(c, vm, path)
        assert got.status_code == 200, (path, got.text)
        assert got.content == sandbox_hostname, path

    for path in (
        "../../../../etc/hostname",
        "/../../../../../etc/hostname",
        "/etc/../../../etc/hostname",
        "/root/rootlink/etc/hostname",
        "/root/rootlink/../../../etc/hostname",
        "/root/up/hostname",
        "/root/uproot/etc/hostname",
    ):
        assert_sandbox_hostname(path)
    if "hardlink" in names(c, vm, "/root"):
        assert_sandbox_hostname("/root/hardlink")

    # the host's marker is out of reach however it is named
    assert marker.read_bytes() == secret
    for path in (
        str(marker),
        f"../../../../..{marker}",
        f"/root/rootlink{marker}",
        f"/root/rootlink/../..{marker}",
        f"/root/up/../../../..{marker}",
        f"/root/uproot{marker}",
    ):
        got = download(c, vm, path)
        assert secret not in got.content, path
        assert_error(got, 404, "file_not_found")

    # /proc/1/root is a magic link (it would jump past the root): refused, never followed
    for path in ("/root/p1/etc/hostname", f"/root/p1{marker}", "/proc/1/root/etc/hostname"):
        got = download(c, vm, path)
        assert secret not in got.content, path
        assert host_hostname not in got.content, path
        assert_error(got, 400, "invalid_path")
    # /proc/self means nothing to the host process in the sandbox's procfs
    assert_error(download(c, vm, "/root/selfroot/etc/hostname"), 404, "file_not_found")

    # listings: the host's /tmp directory is not there, `..` stops at the sandbox's root
    for path in (
        str(marker.parent),
        f"/root/rootlink{marker.parent}",
        f"../../../..{marker.parent}",
        f"/root/up/../../..{marker.parent}",
    ):
        assert_error(listing(c, vm, path), 404, "file_not_found")
    assert marker.parent.name not in names(c, vm, "/root/rootlink/tmp")
    assert names(c, vm, "/root/rootlink/") == names(c, vm, "/")
    assert names(c, vm, "/../../..") == names(c, vm, "/")
    assert names(c, vm, "/root/up") == names(c, vm, "/etc")
    assert_error(listing(c, vm, "/root/p1"), 400, "invalid_path")


def test_uploads_through_links_and_dotdot_write_inside_the_sandbox(
    owner: Account, vm: str, host_marker: tuple[Path, bytes]
) -> None:
    c = owner.client
    marker, secret = host_marker
    _escape_links(c, vm)
    token = secrets.token_hex(6)

    cases = {
        f"/root/rootlink/tmp/corral-up-{token}-1.txt": f"/tmp/corral-up-{token}-1.txt",
        f"/../../../../tmp/corral-up-{token}-2.txt": f"/tmp/corral-up-{token}-2.txt",
        f"/root/up/../../../../tmp/corral-up-{token}-3.txt": f"/tmp/corral-up-{token}-3.txt",
        f"/root/uproot/tmp/corral-up-{token}-4.txt": f"/tmp/corral-up-{token}-4.txt",
        f"/root/rootlink/tmp/corral-dir-{token}/deep/f.txt": f"/tmp/corral-dir-{token}/deep/f.txt",
    }
    for path, inside in cases.items():
        content = f"written via {path}".encode()
        resp = upload(c, vm, path, content)
        assert resp.status_code == 201, (path, resp.text)
        assert sh(c, vm, f"cat {inside}") == content.decode(), path
        assert not Path(inside).exists(), f"{path} wrote {inside} on the host"
    assert not Path(f"/tmp/corral-dir-{token}").exists()

    # over the host marker's name: the sandbox gets a new file, the host's marker is untouched
    resp = upload(c, vm, f"/root/rootlink{marker}", b"overwritten?")
    assert resp.status_code == 201, resp.text
    assert sh(c, vm, f"cat {marker}") == "overwritten?"
    assert marker.read_bytes() == secret
    assert upload(c, vm, f"../../../..{marker}", b"again").status_code == 201
    assert marker.read_bytes() == secret

    # writing onto a link replaces the link, never its target
    sh(c, vm, "ln -s /etc/hostname /root/hostlink")
    before = sh(c, vm, "cat /etc/hostname")
    assert upload(c, vm, "/root/hostlink", b"plain file now").status_code == 201
    assert sh(c, vm, "stat -c %F /root/hostlink; cat /etc/hostname") == f"regular file\n{before}"

    # through the magic link: refused, and nothing written anywhere
    assert_error(upload(c, vm, f"/root/p1/tmp/corral-up-{token}-5.txt", b"x"), 400, "invalid_path")
    assert not Path(f"/tmp/corral-up-{token}-5.txt").exists()
    assert f"corral-up-{token}-5.txt" not in names(c, vm, "/tmp")


# ---- the disk quota -----------------------------------------------------------------------------------------


def test_disk_full_answers_507_and_leaves_no_partial_file(owner: Account) -> None:
    c = owner.client
    vm_id = create_ready(c, disk_mib=128)["id"]
    try:
        before = names(c, vm_id, "/root")
        digest = hashlib.sha256()
        resp = upload(c, vm_id, "/root/huge.bin", random_chunks(200 * MIB, digest))
        assert_error(resp, 507, "disk_full")

        after = names(c, vm_id, "/root")
        assert "huge.bin" not in after
        assert not [n for n in after if "huge.bin" in n or "corral-upload" in n], after
        assert after == before
        assert sh(c, vm_id, "ls -A /root | grep -c huge || true").strip() == "0"

        # the space is given back: the sandbox can still write, and so can an upload
        assert (
            sh(c, vm_id, "echo still-writable > /root/after.txt && cat /root/after.txt") == "still-writable\n"
        )
        small = os.urandom(8 * MIB)
        assert upload(c, vm_id, "/root/small.bin", small).status_code == 201
        assert download(c, vm_id, "/root/small.bin").content == small
    finally:
        destroy(c, vm_id)


# ---- errors -------------------------------------------------------------------------------------------------


def test_another_users_vm_is_not_found(owner: Account, stranger: Account, vm: str) -> None:
    c = owner.client
    assert upload(c, vm, "/root/mine.txt", b"mine").status_code == 201
    s = stranger.client
    assert_error(upload(s, vm, "/root/theirs.txt", b"x"), 404, "vm_not_found")
    assert_error(download(s, vm, "/root/mine.txt"), 404, "vm_not_found")
    assert_error(listing(s, vm, "/root"), 404, "vm_not_found")
    assert "theirs.txt" not in names(c, vm, "/root")

    missing = "vm_" + "z" * 12
    assert_error(upload(c, missing, "/root/x", b"x"), 404, "vm_not_found")
    assert_error(download(c, missing, "/root/x"), 404, "vm_not_found")
    assert_error(listing(c, missing, "/root"), 404, "vm_not_found")

    with httpx.Client(base_url=str(c.base_url), timeout=30.0) as anon:
        assert_error(upload(anon, vm, "/root/anon.txt", b"x"), 401)
        assert_error(download(anon, vm, "/root/mine.txt"), 401)
        assert_error(listing(anon, vm, "/root"), 401)


def test_a_stopped_vm_is_not_running(owner: Account) -> None:
    c = owner.client
    vm_id = create_ready(c)["id"]
    try:
        assert upload(c, vm_id, "/root/kept.txt", b"kept").status_code == 201
        stopped = c.post(f"/v1/vms/{vm_id}/stop")
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["status"] == "stopped"
        assert_error(upload(c, vm_id, "/root/x.txt", b"x"), 409, "vm_not_running")
        assert_error(download(c, vm_id, "/root/kept.txt"), 409, "vm_not_running")
        assert_error(listing(c, vm_id, "/root"), 409, "vm_not_running")
    finally:
        destroy(c, vm_id)


def test_bad_paths_and_modes_are_refused(owner: Account, vm: str) -> None:
    c = owner.client
    # NUL is refused before any handler runs
    assert_error(upload(c, vm, "/root/a\x00b", b"x"), 400, "invalid_parameter")
    assert_error(download(c, vm, "/etc/hostname\x00.txt"), 400, "invalid_parameter")
    assert_error(listing(c, vm, "/root\x00"), 400, "invalid_parameter")
    assert not [n for n in names(c, vm, "/root") if n.startswith("a")]

    # an empty path is not a path
    assert_error(upload(c, vm, "", b"x"), 400, "invalid_path")
    assert_error(download(c, vm, ""), 400, "invalid_path")
    assert_error(listing(c, vm, ""), 400, "invalid_path")
    # nor is the root, or a path over 4096 characters, as an upload target
    assert_error(upload(c, vm, "/", b"x"), 400, "invalid_path")
    long_path = "/root/" + "d/" * 2100 + "f"
    assert_error(upload(c, vm, long_path, b"x"), 400, "invalid_parameter")
    assert_error(download(c, vm, long_path), 400, "invalid_parameter")
    # a missing path parameter
    assert_error(c.get(f"/v1/vms/{vm}/files/download"), 400, "invalid_parameter")
    assert_error(c.post(f"/v1/vms/{vm}/files/upload", content=b"x"), 400, "invalid_parameter")

    for mode in ("999", "abc", "", "0o644", "-644", "123456", "8"):
        assert_error(upload(c, vm, "/root/moded.txt", b"x", mode=mode), 400, "invalid_parameter")
    assert "moded.txt" not in names(c, vm, "/root")
    assert_error(upload(c, vm, "/root/p.txt", b"x", parents="maybe"), 400, "invalid_parameter")

    # only regular files download
    assert_error(download(c, vm, "/root"), 409, "is_a_directory")
    assert_error(download(c, vm, "/dev/null"), 400, "invalid_path")
    assert_error(download(c, vm, "/root/nothing-here"), 404, "file_not_found")


# ---- edge cases found while writing these tests -------------------------------------------------------------


def test_upload_accepts_the_longest_valid_file_name(owner: Account, vm: str) -> None:
    """A 255-byte name is valid on Linux (exec can create it), so an upload must be able to create it too."""
    c = owner.client
    name = "n" * 255
    sh(c, vm, f"touch /tmp/{name} && rm /tmp/{name}")
    resp = upload(c, vm, f"/root/{name}", b"long name")
    assert resp.status_code == 201, resp.text
    assert sh(c, vm, f"cat /root/{name}") == "long name"


def test_download_of_a_file_whose_size_is_not_its_length_is_complete_or_refused(
    owner: Account, vm: str
) -> None:
    """Pseudo-files (st_size 0 but content, like /proc/*) must not break the response: either their bytes
    arrive whole or the API refuses them cleanly; never a dropped connection or a silently empty body."""
    c = owner.client
    paths = ("/proc/1/cmdline", "/proc/meminfo")
    held = {path: base64.b64decode(sh(c, vm, f"base64 -w0 {path}")) for path in paths}
    problems: list[str] = []
    for path, expected in held.items():
        try:
            with httpx.Client(base_url=c.base_url, headers=c.headers, timeout=30.0) as fresh:
                got = download(fresh, vm, path)  # a connection of its own: a broken one is not reused
        except httpx.TransportError as exc:
            problems.append(f"{path}: the connection broke instead of an answer: {exc!r}")
            continue
        if got.status_code == 200:
            if path == "/proc/1/cmdline" and got.content != expected:
                problems.append(f"{path}: 200 with {got.content!r}, the file holds {expected!r}")
            elif path == "/proc/meminfo" and not got.content.startswith(b"MemTotal:"):
                problems.append(f"{path}: 200 with {got.content[:60]!r}, not the file's content")
        elif not 400 <= got.status_code < 500:
            problems.append(f"{path}: {got.status_code} {got.text}")
        else:
            assert_error(got, got.status_code)
    assert not problems, "\n".join(problems)
