"""Getting into a real sandbox: SSH with the stock OpenSSH client (shell on a terminal with resizing, commands
with exit status and stdin, scp and sftp both ways, ``ssh -L``, refused keys and stopped VMs), and the
terminal and shell WebSockets. Each test checks what the sandbox did, not only what came back."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.sandbox.test_cli_vm import cli
from tests.support import Account, Server, free_port
from tests.vmtools import _KEY_DIR, create_ready, destroy, public_key, run


@pytest.fixture(scope="module")
def account(node: Server) -> Iterator[Account]:
    from tests.support import signup

    acct = signup(node)
    yield acct
    acct.client.close()


@pytest.fixture(scope="module")
def vm(account: Account) -> Iterator[dict[str, Any]]:
    made = create_ready(account.client)
    yield made
    destroy(account.client, made["id"])


@pytest.fixture(scope="module")
def ssh_info(
    account: Account, vm: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    resp = account.client.get(f"/v1/vms/{vm['id']}/ssh")
    assert resp.status_code == 200, resp.text
    info: dict[str, Any] = resp.json()
    known = tmp_path_factory.mktemp("ssh") / "known_hosts"
    host = info["host"] if info["port"] == 22 else f"[{info['host']}]:{info['port']}"
    known.write_text(f"{host} {info['host_key']}\n")
    info["known_hosts"] = str(known)
    return info


def key_file() -> str:
    public_key()  # makes the pair once
    return str(_KEY_DIR / "id_ed25519")


def ssh_argv(info: dict[str, Any], *extra: str, key: str | None = None, tool: str = "ssh") -> list[str]:
    port_flag = "-P" if tool in ("scp", "sftp") else "-p"
    return [
        tool,
        "-i",
        key or key_file(),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={info['known_hosts']}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        port_flag,
        str(info["port"]),
        *extra,
    ]


def ssh(
    info: dict[str, Any], command: str, *, stdin: bytes = b"", key: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    argv = ssh_argv(info, f"{info['username']}@{info['host']}", command, key=key)
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=60, check=False)


def test_ssh_info_is_iron_sh_shaped(ssh_info: dict[str, Any], vm: dict[str, Any]) -> None:
    assert ssh_info["username"] == vm["id"]
    assert ssh_info["host"] == "127.0.0.1"
    assert isinstance(ssh_info["port"], int)
    assert ssh_info["port"] > 0
    assert ssh_info["command"] == f"ssh -p {ssh_info['port']} {vm['id']}@127.0.0.1"
    assert ssh_info["host_key"].startswith("ssh-ed25519 ")


def test_ssh_info_of_unknown_or_foreign_vm_is_404(node: Server, account: Account, vm: dict[str, Any]) -> None:
    assert account.client.get("/v1/vms/vm_doesnotexist/ssh").json()["error"]["code"] == "vm_not_found"
    from tests.support import signup

    other = signup(node, first_name="Eve")
    try:
        resp = other.client.get(f"/v1/vms/{vm['id']}/ssh")
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "vm_not_found"
    finally:
        other.client.close()


def test_ssh_command_exit_status_stdin_and_effect(
    ssh_info: dict[str, Any], account: Account, vm: dict[str, Any]
) -> None:
    done = ssh(ssh_info, "echo out; echo err >&2; whoami; exit 3")
    assert done.returncode == 3, done.stderr
    assert done.stdout == b"out\nroot\n"
    assert done.stderr == b"err\n"
    payload = os.urandom(300_000)
    done = ssh(ssh_info, "cat > /root/from-ssh.bin && sha256sum /root/from-ssh.bin", stdin=payload)
    assert done.returncode == 0, done.stderr
    import hashlib

    digest = hashlib.sha256(payload).hexdigest()
    assert done.stdout.split()[0].decode() == digest
    # the sandbox has the file (seen through the API, not through SSH)
    seen = run(account.client, vm["id"], "sha256sum /root/from-ssh.bin")
    assert seen["stdout"].split()[0] == digest
    # the session ran inside the sandbox: its hostname, its pid namespace
    done = ssh(ssh_info, "hostname; cat /proc/1/cmdline | tr '\\0' ' '")
    assert done.stdout.decode().splitlines()[0] == run(account.client, vm["id"], "hostname")["stdout"].strip()
    assert "/.corral/init" in done.stdout.decode()


def test_ssh_refuses_other_keys(ssh_info: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    done = ssh(ssh_info, "true", key=str(other))
    assert done.returncode == 255
    assert b"Permission denied (publickey)" in done.stderr
    wrong_user = subprocess.run(
        ssh_argv(ssh_info, f"vm_nosuchvm@{ssh_info['host']}", "true"),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert wrong_user.returncode == 255
    assert b"Permission denied (publickey)" in wrong_user.stderr


def test_ssh_refuses_a_stopped_vm_cleanly(account: Account, tmp_path: Path) -> None:
    other = create_ready(account.client)
    try:
        info = account.client.get(f"/v1/vms/{other['id']}/ssh").json()
        known = tmp_path / "known_hosts"
        known.write_text(f"[{info['host']}]:{info['port']} {info['host_key']}\n")
        info["known_hosts"] = str(known)
        assert ssh(info, "true").returncode == 0
        assert account.client.post(f"/v1/vms/{other['id']}/stop").status_code == 200
        done = ssh(info, "true")
        assert done.returncode == 255
        assert b"not running" in done.stderr, done.stderr
    finally:
        destroy(account.client, other["id"])


def _read_until(fd: int, needle: bytes, timeout: float = 15.0) -> bytes:
    seen = b""
    end = time.monotonic() + timeout
    while needle not in seen:
        left = end - time.monotonic()
        assert left > 0, f"did not see {needle!r} in {seen[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_ssh_interactive_shell_on_a_terminal_follows_resizes(
    ssh_info: dict[str, Any], account: Account, vm: dict[str, Any]
) -> None:
    master, slave = pty.openpty()
    _set_size(slave, 30, 100)
    proc = subprocess.Popen(
        ssh_argv(ssh_info, "-tt", f"{ssh_info['username']}@{ssh_info['host']}"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)
    try:
        os.write(master, b"tty; stty size; echo MARK-$((6*7))\n")
        out = _read_until(master, b"MARK-42")
        assert b"/dev/pts/" in out
        assert b"30 100" in out
        _set_size(master, 45, 132)  # the client sees SIGWINCH and sends a window change
        os.write(master, b"stty size; echo MARK2-$((7*7))\n")
        out = _read_until(master, b"MARK2-49")
        assert b"45 132" in out
        os.write(master, b"echo typed-in-a-terminal > /root/interactive.txt; exit 7\n")
        assert proc.wait(timeout=30) == 7
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert run(account.client, vm["id"], "cat /root/interactive.txt")["stdout"] == "typed-in-a-terminal\n"


def test_ssh_local_forward_reaches_a_server_inside(
    ssh_info: dict[str, Any], account: Account, vm: dict[str, Any]
) -> None:
    # a server bound to the sandbox's own loopback only
    run(account.client, vm["id"], "mkdir -p /root/www && echo forwarded-ok > /root/www/index.html")
    run(
        account.client,
        vm["id"],
        "cd /root/www && nohup python3 -m http.server 8123 --bind 127.0.0.1 > /root/www.log 2>&1 &",
    )
    local = free_port()
    proc = subprocess.Popen(
        ssh_argv(
            ssh_info,
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            f"127.0.0.1:{local}:127.0.0.1:8123",
            f"{ssh_info['username']}@{ssh_info['host']}",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        body = ""
        end = time.monotonic() + 20
        while time.monotonic() < end:
            with contextlib.suppress(httpx.HTTPError):
                body = httpx.get(f"http://127.0.0.1:{local}/index.html", timeout=5).text
                break
            time.sleep(0.1)
        assert body == "forwarded-ok\n"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    log = run(account.client, vm["id"], "cat /root/www.log")["stdout"]
    assert "GET /index.html" in log  # the request reached the server in the sandbox
    # a forward to a host address instead of the sandbox is refused
    proc = subprocess.Popen(
        ssh_argv(
            ssh_info,
            "-N",
            "-L",
            f"127.0.0.1:{local}:10.0.0.1:80",
            f"{ssh_info['username']}@{ssh_info['host']}",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        end = time.monotonic() + 20
        while True:  # the client listens, but the gateway refuses the channel: the connection just closes
            try:
                conn = socket.create_connection(("127.0.0.1", local), timeout=5)
                break
            except OSError:
                assert time.monotonic() < end
                time.sleep(0.1)
        with conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                answer = conn.recv(100)
            except ConnectionResetError:
                answer = b""
            assert answer == b""
    finally:
        proc.kill()
        proc.wait(timeout=10)


# ---- WebSockets -----------------------------------------------------------------------------------------------


def ws_url(server: Server, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


@contextlib.contextmanager
def terminal(
    server: Server, vm_id: str, token: str, query: str = "", header: bool = True
) -> Iterator[ClientConnection]:
    headers = {"Authorization": f"Bearer {token}"} if header else None
    with connect(
        ws_url(server, f"/v1/vms/{vm_id}/terminal{query}"), additional_headers=headers, open_timeout=20
    ) as ws:
        yield ws


def _collect(ws: ClientConnection, needle: bytes, timeout: float = 15.0) -> bytes:
    seen = b""
    end = time.monotonic() + timeout
    while needle not in seen:
        message = ws.recv(timeout=max(0.01, end - time.monotonic()))
        if isinstance(message, bytes):
            seen += message
    return seen


def next_text(ws: ClientConnection) -> dict[str, Any]:
    """The next control message, past the terminal's output."""
    while True:
        message = ws.recv(timeout=15)
        if isinstance(message, str):
            parsed: dict[str, Any] = json.loads(message)
            return parsed


def test_terminal_websocket(node: Server, account: Account, vm: dict[str, Any]) -> None:
    with terminal(node, vm["id"], account.token, "?cols=90&rows=20") as ws:
        ws.send(b"tty; stty size; echo T-$((5*5))\n")
        out = _collect(ws, b"T-25")
        assert b"/dev/pts/" in out
        assert b"20 90" in out
        ws.send(json.dumps({"type": "resize", "cols": 150, "rows": 50}))
        ws.send(
            json.dumps(
                {"type": "input", "data": "stty size; echo R-$((4*4)) > /root/term.txt; echo RD-$((9*9))\n"}
            )
        )
        out = _collect(ws, b"RD-81")
        assert b"50 150" in out
        ws.send(json.dumps({"type": "resize", "cols": "wide"}))
        assert next_text(ws)["code"] == "validation_error"
        ws.send(b"sleep 300 & exit 5\n")  # a background process keeps the terminal open: the exit still comes
        assert next_text(ws) == {"type": "exit", "exit_code": 5}
    assert run(account.client, vm["id"], "cat /root/term.txt")["stdout"] == "R-16\n"


def test_terminal_auth(node: Server, account: Account, vm: dict[str, Any]) -> None:
    with terminal(node, vm["id"], account.token, f"?token={account.token}", header=False) as ws:
        ws.send(b"echo Q-$((3*3))\n")
        _collect(ws, b"Q-9")
    with pytest.raises(InvalidStatus) as denied, terminal(node, vm["id"], "", header=False):
        pass
    assert denied.value.response.status_code == 401
    assert json.loads(denied.value.response.body or b"{}")["error"]["code"] == "unauthorized"
    from tests.support import signup

    other = signup(node, first_name="Mallory")
    try:
        with pytest.raises(InvalidStatus) as denied, terminal(node, vm["id"], other.token):
            pass
        assert denied.value.response.status_code == 404
    finally:
        other.client.close()


def shell_call(ws: ClientConnection, command: str, **fields: Any) -> dict[str, Any]:
    ws.send(json.dumps({"command": command, **fields}))
    out: dict[str, Any] = {"stdout": "", "stderr": ""}
    while True:
        message = json.loads(ws.recv(timeout=30))
        if message["type"] in ("stdout", "stderr"):
            out[message["type"]] += message["data"]
        elif message["type"] == "exit":
            out.update(message)
            return out
        else:
            out.setdefault("other", []).append(message)
            if message["type"] == "error":
                return out


def test_shell_websocket_keeps_state(node: Server, account: Account, vm: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {account.token}"}
    with connect(
        ws_url(node, f"/v1/vms/{vm['id']}/shell"), additional_headers=headers, open_timeout=20
    ) as ws:
        assert json.loads(ws.recv(timeout=20))["type"] == "ready"
        assert shell_call(ws, "cd /tmp && export GREETING='hi there'")["exit_code"] == 0
        assert shell_call(ws, "pwd")["stdout"] == "/tmp\n"
        got = shell_call(ws, 'echo "$GREETING"; echo oops >&2; (exit 4)')
        assert (got["stdout"], got["stderr"], got["exit_code"]) == ("hi there\n", "oops\n", 4)
        assert shell_call(ws, "f() { echo fn-$1; }")["exit_code"] == 0
        assert shell_call(ws, "f 12")["stdout"] == "fn-12\n"
        # a command that reads stdin gets EOF, not the next commands
        assert shell_call(ws, "cat; echo after-cat")["stdout"] == "after-cat\n"
        # quoting does not matter: the command is passed verbatim
        tricky = "printf '%s|' \"a b\" 'c\"d' $'e\\tf' && echo"
        assert shell_call(ws, tricky)["stdout"] == 'a b|c"d|e\tf|\n'
        assert shell_call(ws, "echo in-sandbox > shell-file.txt")["exit_code"] == 0
        timed = shell_call(ws, "sleep 30", timeout=0.5)
        assert timed["timed_out"] is True
        assert timed["shell_restarted"] is True
        assert timed["exit_code"] == 124
        assert shell_call(ws, "pwd")["stdout"] == "/root\n"  # a fresh shell
        exited = shell_call(ws, "exit 9")
        assert exited["exit_code"] == 9
        assert exited["shell_restarted"] is True
        assert shell_call(ws, "echo again")["stdout"] == "again\n"
        ws.send('{"command": 5}')
        bad = json.loads(ws.recv(timeout=10))
        assert bad["type"] == "error"
        assert bad["code"] == "validation_error"
    assert run(account.client, vm["id"], "cat /tmp/shell-file.txt")["stdout"] == "in-sandbox\n"


def test_cli_vm_ssh(node: Server, account: Account, vm: dict[str, Any], tmp_path: Path) -> None:
    ran = cli(node, account, "ssh", vm["name"], "-i", key_file(), "--", "hostname; exit 6", cwd=tmp_path)
    assert ran.returncode == 6, ran.stderr
    assert ran.stdout.strip() == run(account.client, vm["id"], "hostname")["stdout"].strip()
    known = (tmp_path / ".config" / "corral" / "known_hosts").read_text()
    info = account.client.get(f"/v1/vms/{vm['id']}/ssh").json()
    assert known == f"[127.0.0.1]:{info['port']} {info['host_key']}\n"


def count_running(account: Account, vm_id: str, argv: str) -> int:
    listing = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done"
    out = run(account.client, vm_id, listing)["stdout"]
    return sum(1 for line in out.splitlines() if line.strip() == argv)


def wait_count(account: Account, vm_id: str, argv: str, expected: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while (n := count_running(account, vm_id, argv)) != expected:
        assert time.monotonic() < end, f"{n} processes {argv!r}, expected {expected}"
        time.sleep(0.1)


def test_leaving_ends_the_session_processes(
    node: Server, account: Account, vm: dict[str, Any], ssh_info: dict[str, Any]
) -> None:
    with terminal(node, vm["id"], account.token) as ws:
        ws.send(b"sleep 4242\n")
        wait_count(account, vm["id"], "sleep 4242", 1)
    wait_count(account, vm["id"], "sleep 4242", 0)  # the client went away: its terminal's commands end
    proc = subprocess.Popen(
        ssh_argv(ssh_info, f"{ssh_info['username']}@{ssh_info['host']}", "sleep 4343"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_count(account, vm["id"], "sleep 4343", 1)
    finally:
        proc.kill()
        proc.wait()
    wait_count(account, vm["id"], "sleep 4343", 0)


def test_terminal_bad_size_is_a_clear_error(node: Server, account: Account, vm: dict[str, Any]) -> None:
    with pytest.raises(InvalidStatus) as denied, terminal(node, vm["id"], account.token, "?cols=wide"):
        pass
    assert denied.value.response.status_code == 422
    assert b"cols must be an integer" in (denied.value.response.body or b"")


def test_scp_and_sftp_both_ways(
    ssh_info: dict[str, Any], account: Account, vm: dict[str, Any], tmp_path: Path
) -> None:
    import hashlib

    target = f"{ssh_info['username']}@{ssh_info['host']}"
    local = tmp_path / "up.bin"
    local.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    local.chmod(0o640)
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    up = subprocess.run(
        [*ssh_argv(ssh_info, "-p", tool="scp"), str(local), f"{target}:/root/scp-up.bin"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    seen = run(account.client, vm["id"], "sha256sum /root/scp-up.bin; stat -c '%a %u:%g' /root/scp-up.bin")
    assert seen["stdout"].split()[0] == digest
    assert seen["stdout"].splitlines()[1] == "640 0:0"  # the mode kept, owned by root inside
    run(account.client, vm["id"], "mkdir -p /root/tree/sub && echo deep > /root/tree/sub/f.txt")
    down = subprocess.run(
        [*ssh_argv(ssh_info, "-r", tool="scp"), f"{target}:/root/tree", str(tmp_path / "tree")],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert down.returncode == 0, down.stderr
    assert (tmp_path / "tree" / "sub" / "f.txt").read_text() == "deep\n"

    batch = tmp_path / "batch"
    batch.write_text(
        f"mkdir /root/sftp-dir\nput {local} /root/sftp-dir/in.bin\nrename /root/sftp-dir/in.bin /root/sftp-dir/moved.bin\n"
        f"symlink /etc/hostname /root/sftp-dir/host-link\nget /root/sftp-dir/host-link {tmp_path / 'hostname'}\n"
        f"get /root/sftp-dir/moved.bin {tmp_path / 'back.bin'}\nls -l /root/sftp-dir\n"
    )
    done = subprocess.run(
        [*ssh_argv(ssh_info, "-b", str(batch), tool="sftp"), target],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).hexdigest() == digest
    # the link resolved inside the sandbox: its hostname, not the host's
    assert (tmp_path / "hostname").read_text() == run(account.client, vm["id"], "cat /etc/hostname")["stdout"]
    assert run(account.client, vm["id"], "ls /root/sftp-dir")["stdout"].split() == ["host-link", "moved.bin"]
