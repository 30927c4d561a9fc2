"""The gateway's SFTP server driven by the stock OpenSSH ``sftp`` and ``scp`` (SFTP mode), over a temporary
directory standing in for a sandbox's root: transfers both ways with content, mode and owner checked on the
"sandbox" side, the usual commands, and escape attempts (links out, ``..``, a linked directory) that must stay
inside the root."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from corral.node.files import SandboxFiles
from corral.runtime.syscalls import mount, umount
from corral.ssh.sftp import SandboxSFTP, lexical_realpath, open_flags, sandbox_path
from tests.userns_box import userns_box

OFFSET = 231072  # the fake sandbox root's host uid/gid (ids 0..65535 inside map to OFFSET..)
PASSWD = "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000::/home/builder:/bin/sh\n"


@dataclass
class Gateway:
    port: int
    key: Path
    roots: dict[str, SandboxFiles]


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """An asyncssh server on an ephemeral port, in a thread, whose SFTP sessions serve the root registered
    under the login name."""
    keys = tmp_path_factory.mktemp("keys")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key.write_private_key(str(keys / "id"))
    (keys / "id").chmod(0o600)
    authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
    roots: dict[str, SandboxFiles] = {}
    loop = asyncio.new_event_loop()

    def sftp(chan: asyncssh.SSHServerChannel[bytes]) -> asyncssh.SFTPServer:
        return SandboxSFTP(chan, roots[chan.get_extra_info("username")])

    server = loop.run_until_complete(
        asyncssh.create_server(
            _Server,
            "127.0.0.1",
            0,
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            authorized_client_keys=authorized,
            sftp_factory=sftp,
            sftp_version=6,  # OpenSSH asks for 3; asyncssh clients may use 6 (open56, precise statuses)
        )
    )
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield Gateway(port, keys / "id", roots)
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@dataclass
class Sandbox:
    user: str
    root: Path  # the sandbox's "/"
    local: Path  # the client's working directory
    gateway: Gateway

    def sftp(self, *commands: str) -> subprocess.CompletedProcess[str]:
        batch = self.local / "batch"
        batch.write_text("\n".join(commands) + "\n")
        return self._run(["sftp", "-b", str(batch), *self._opts("-P"), f"{self.user}@127.0.0.1"])

    def scp(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(["scp", *self._opts("-P"), *args])

    def remote(self, path: str) -> str:
        return f"{self.user}@127.0.0.1:{path}"

    def _opts(self, port_flag: str) -> list[str]:
        return [
            port_flag,
            str(self.gateway.port),
            "-i",
            str(self.gateway.key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=self.local, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def box(gateway: Gateway, tmp_path: Path) -> Iterator[Sandbox]:
    """A stand-in sandbox: a tmpfs root (a filesystem a sandbox keeps files on) and a process in a user
    namespace mapping 0.. to OFFSET.. chrooted there, whose credentials the SFTP session's worker takes."""
    root = tmp_path / "rootfs"
    root.mkdir()
    mount("tmpfs", str(root), "tmpfs", 0, "mode=0755")
    try:
        for d in ("root", "etc", "tmp"):
            (root / d).mkdir(parents=True)
        (root / "etc" / "passwd").write_text(PASSWD)
        (root / "etc" / "group").write_text("root:x:0:\nbuilder:x:1000:\n")
        (root / "etc" / "shadow").write_text("sandbox shadow\n")
        for path in (root, *root.rglob("*")):
            os.chown(path, OFFSET, OFFSET)
        local = tmp_path / "local"
        local.mkdir()
        user = f"sb{secrets.token_hex(4)}"
        with userns_box(root, OFFSET) as pid:
            gateway.roots[user] = SandboxFiles(pid, OFFSET, OFFSET)
            try:
                yield Sandbox(user, root, local, gateway)
            finally:
                del gateway.roots[user]
    finally:
        umount(str(root), lazy=True)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# ---- transfers -------------------------------------------------------------------------------------------


def test_put_and_get_with_sftp(box: Sandbox) -> None:
    data = os.urandom(300_000) + b"end"  # several requests, some handled in a thread
    (box.local / "up.bin").write_bytes(data)
    (box.local / "up.bin").chmod(0o640)
    ok(box.sftp("put up.bin", "get up.bin back.bin", "get /etc/passwd passwd"))
    placed = box.root / "root" / "up.bin"
    assert placed.read_bytes() == data
    st = placed.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, OFFSET, OFFSET)
    assert (box.local / "back.bin").read_bytes() == data
    assert (box.local / "passwd").read_text() == PASSWD


def test_scp_both_ways(box: Sandbox) -> None:
    (box.local / "s.txt").write_text("over scp\n")
    (box.local / "s.txt").chmod(0o755)
    ok(box.scp("s.txt", box.remote("/tmp/")))
    placed = box.root / "tmp" / "s.txt"
    assert placed.read_text() == "over scp\n"
    assert (placed.stat().st_mode & 0o777, placed.stat().st_uid) == (0o755, OFFSET)
    placed.write_text("changed inside\n")
    ok(box.scp(box.remote("/tmp/s.txt"), "s2.txt"))
    assert (box.local / "s2.txt").read_text() == "changed inside\n"
    ok(box.scp("-r", box.remote("/etc"), "etc-copy"))
    assert (box.local / "etc-copy" / "shadow").read_text() == "sandbox shadow\n"


def test_overwrite_truncates_and_append_keeps(box: Sandbox) -> None:
    (box.root / "root" / "f").write_text("a much longer old content\n")
    os.chown(box.root / "root" / "f", OFFSET, OFFSET)  # the sandbox's file (root's there)
    (box.local / "f").write_text("new\n")
    (box.local / "tail").write_text("+more\n")
    ok(box.sftp("put f", "reput tail f"))  # reput: resume, appending past the remote's size
    assert (box.root / "root" / "f").read_text() == "new\n" + "+more\n"[len("new\n") :]


# ---- commands --------------------------------------------------------------------------------------------


def test_directory_commands_and_listing(box: Sandbox) -> None:
    (box.root / "root" / "a.txt").write_text("A\n")
    os.chown(box.root / "root" / "a.txt", OFFSET + 1000, OFFSET + 1000)
    out = ok(
        box.sftp(
            "mkdir d",
            "mkdir d/e",
            "rename a.txt d/b.txt",
            "ln -s /etc/passwd d/pw",
            "ln d/b.txt d/hard.txt",
            "chmod 600 d/b.txt",
            "ls -l d",
            "ls -ln d",
            "pwd",
            "cd d",
            "pwd",
            "df /",
        )
    )
    d = box.root / "root" / "d"
    assert d.is_dir()
    assert (d / "e").is_dir()
    assert (d.stat().st_uid, d.stat().st_mode & 0o777) == (OFFSET, 0o755)
    assert (d / "b.txt").read_text() == "A\n"
    assert not (box.root / "root" / "a.txt").exists()
    assert (d / "b.txt").stat().st_mode & 0o777 == 0o600
    assert os.readlink(d / "pw") == "/etc/passwd"  # stored verbatim, never resolved on the host
    assert d.joinpath("pw").lstat().st_uid == OFFSET
    assert (d / "hard.txt").stat().st_ino == (d / "b.txt").stat().st_ino
    long_lines = [line for line in out.splitlines() if line.startswith("-") and line.endswith("b.txt")]
    assert long_lines[0].split()[2:4] == ["builder", "builder"]  # names from the sandbox's /etc/passwd
    assert long_lines[1].split()[2:4] == ["1000", "1000"]  # ids as seen inside
    assert any(line.startswith("l") and line.endswith(" pw") for line in out.splitlines())
    assert "Remote working directory: /root\n" in out
    assert "Remote working directory: /root/d\n" in out
    assert "%Capacity" in out  # statvfs@openssh.com
    ok(box.sftp("rm d/pw", "rm d/hard.txt", "rm d/b.txt", "rmdir d/e", "rmdir d"))
    assert not d.exists()


def test_chown_maps_ids_and_refuses_unmapped(box: Sandbox) -> None:
    f = box.root / "root" / "owned"
    f.write_text("x")
    os.chown(f, OFFSET, OFFSET)  # the sandbox root's file: its root may chown it
    ok(box.sftp("chown 1000 owned", "chgrp 33 owned"))
    assert (f.stat().st_uid, f.stat().st_gid) == (OFFSET + 1000, OFFSET + 33)
    refused = box.sftp("chown 70000 owned")
    assert refused.returncode != 0
    assert f.stat().st_uid == OFFSET + 1000


def test_errors_are_reported(box: Sandbox) -> None:
    (box.root / "root" / "full").mkdir()
    (box.root / "root" / "full" / "x").write_text("x")
    for command, message in (
        ("get nothing-here", "not found"),
        ("rmdir full", "Failure"),  # directory not empty: a v3 client knows no better code
        ("mkdir full", "Failure"),
        ("ls /nowhere", "not found"),
        ("chown 1000 nothing-here", "No such file"),
        ("rm full", "Failure"),
    ):
        result = box.sftp(command)
        assert result.returncode != 0, command
        assert message in result.stderr, (command, result.stderr)
    assert (box.root / "root" / "full" / "x").exists()


# ---- confinement -----------------------------------------------------------------------------------------


def test_links_pointing_out_resolve_in_the_root(box: Sandbox) -> None:
    home = box.root / "root"
    (home / "abs").symlink_to("/etc/passwd")
    (home / "up").symlink_to("../../../../../../..")
    (home / "shadowlink").symlink_to("/etc/shadow")
    ok(box.sftp("get abs abs.txt", "get up/etc/passwd up.txt", "get /../../etc/shadow shadow.txt"))
    ok(box.sftp("get shadowlink shadow2.txt", "get ../../../etc/shadow shadow3.txt"))
    for name in ("abs.txt", "up.txt"):
        assert (box.local / name).read_text() == PASSWD
    for name in ("shadow.txt", "shadow2.txt", "shadow3.txt"):
        assert (box.local / name).read_text() == "sandbox shadow\n"
    (box.root / "etc" / "shadow").unlink()
    assert box.sftp("get /../../etc/shadow gone.txt").returncode != 0
    assert not (box.local / "gone.txt").exists()


def test_put_through_a_linked_directory_lands_inside(box: Sandbox, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (box.root / "root" / "out").symlink_to(str(outside))  # an absolute host path, as seen from the host
    (box.local / "p.txt").write_text("payload\n")
    assert box.sftp("put p.txt out/p.txt").returncode != 0  # no such directory inside the root
    inside = box.root / str(outside).lstrip("/")
    inside.mkdir(parents=True)
    for made in (inside, *inside.parents):
        if made == box.root:
            break
        os.chown(made, OFFSET, OFFSET)  # made by the sandbox's root, as it would be
    ok(box.sftp("put p.txt out/p.txt", "mkdir out/made", "ln -s /etc out/etc-link"))
    assert list(outside.iterdir()) == []
    assert (inside / "p.txt").read_text() == "payload\n"
    assert (inside / "made").is_dir()
    assert (inside / "p.txt").stat().st_uid == OFFSET


def test_names_ending_the_path_are_not_followed(box: Sandbox, tmp_path: Path) -> None:
    """remove/rename/chmod-less operations act on a link itself; a link to a host file is never touched."""
    host_file = tmp_path / "host-file"
    host_file.write_text("host\n")
    host_file.chmod(0o644)
    (box.root / "root" / "l").symlink_to(str(host_file))
    (box.root / "root" / "ldir").symlink_to("/")
    # chmod follows the link, inside the root, where its target is missing; the rename moves the link itself
    ok(box.sftp("-chmod 777 l", "rename l l2"))
    assert host_file.stat().st_mode & 0o777 == 0o644
    ok(box.sftp("rm l2", "rm ldir"))
    assert host_file.read_text() == "host\n"
    assert not (box.root / "root" / "l2").is_symlink()
    assert (box.root / "etc" / "passwd").exists()


# ---- pure helpers ----------------------------------------------------------------------------------------


def test_paths_and_flags() -> None:
    assert sandbox_path(b"") == "/root"
    assert sandbox_path(b"a//./b/") == "/root/a/b"
    assert sandbox_path(b"/x/../y") == "/x/../y"  # ".." resolved physically, in the root
    assert lexical_realpath(b".") == b"/root"
    assert lexical_realpath(b"../../..") == b"/"
    assert lexical_realpath(b"/a/./b/../c") == b"/a/c"
    assert open_flags(asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC) == (
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    )
    assert open_flags(asyncssh.FXF_READ | asyncssh.FXF_WRITE | asyncssh.FXF_APPEND) == os.O_RDWR | os.O_APPEND
    assert open_flags(asyncssh.FXF_READ) == os.O_RDONLY


# ---- an SFTP v6 client: the status codes a v3 client cannot tell apart -----------------------------------


def test_v6_client_gets_precise_statuses(box: Sandbox) -> None:
    home = box.root / "root"
    (home / "a").write_text("a")
    (home / "b").write_text("b")
    (home / "dir").mkdir()
    (home / "dir" / "x").write_text("x")
    (home / "other").mkdir()
    (home / "ln").symlink_to("../../../etc/shadow")

    async def session() -> None:
        async with (
            asyncssh.connect(
                "127.0.0.1",
                box.gateway.port,
                username=box.user,
                client_keys=[str(box.gateway.key)],
                known_hosts=None,
            ) as conn,
            conn.start_sftp_client(sftp_version=6) as sftp,
        ):
            with pytest.raises(asyncssh.SFTPFileAlreadyExists):
                await sftp.rename("a", "b")  # the standard rename never replaces
            with pytest.raises(asyncssh.SFTPFileAlreadyExists):
                await sftp.rename("dir", "other")
            await sftp.rename("dir", "moved")  # a directory, where hard links cannot do it
            with pytest.raises(asyncssh.SFTPDirNotEmpty):
                await sftp.rmdir("moved")
            with pytest.raises(asyncssh.SFTPNoSuchFile):
                await sftp.stat("/nothing")
            with pytest.raises(asyncssh.SFTPFileIsADirectory):
                await sftp.remove("moved")
            assert await sftp.readlink("ln") == "../../../etc/shadow"
            async with sftp.open("new", "x") as f:  # open56: create-new
                await f.write("made")
            with pytest.raises(asyncssh.SFTPFileAlreadyExists):
                await sftp.open("new", "x")
            async with sftp.open("new", "a") as f:
                await f.write("+more")
            assert (await sftp.statvfs("/")).namemax > 0

    asyncio.run(session())
    assert (home / "a").read_text() == "a"
    assert (home / "b").read_text() == "b"
    assert (home / "moved" / "x").exists()
    assert (home / "other").is_dir()
    assert (home / "new").read_text() == "made+more"
    assert (home / "new").stat().st_uid == OFFSET
