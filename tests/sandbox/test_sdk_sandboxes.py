"""VMs through the SDK against real sandboxes (the session's node server): create and wait, exec and its
stream, files both ways, SSH info, the guest proxy, checkpoint and rollback, hibernate and resume, fork,
a snapshot and a VM booted from it, timers, destroy and history; with ``Client`` and ``AsyncClient``. Each
checks what happened inside the sandbox, not only the answer. Three VMs in all."""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral.sdk.models import ExecExit, ExecOutput, Vm
from tests.support import Server, signup
from tests.vmtools import public_key, unique_name

# the counter's file is replaced whole (written beside it, then renamed), so a read never meets it empty
COUNTER = (
    "nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /root/count.new; mv /root/count.new /root/count; "
    "sleep 0.02; done' >/dev/null 2>&1 & "
    "echo $! > /root/counter.pid"
)


@pytest.fixture(scope="module")
def sdk(node: Server) -> Iterator[corral.Client]:
    account = signup(node)
    account.client.close()
    with corral.Client(account.token, node.url) as client:
        yield client
        for vm in client.vms.iter():
            if vm.status == "running":
                client.vms.stop(vm.id)
            if vm.status != "destroyed":
                client.vms.destroy(vm.id)


@pytest.fixture(scope="module")
def vm(sdk: corral.Client) -> Vm:
    made = sdk.vms.create(name=unique_name("sdk"), public_key=public_key(), timeout=3600)
    assert made.timeout == 3600
    return sdk.vms.wait_ready(made.id, timeout=120)


def sh(sdk: corral.Client, vm_id: str, script: str) -> str:
    out = sdk.vms.exec(vm_id, script)
    assert out.exit_code == 0, out
    return out.stdout


def test_exec_stream_and_files(sdk: corral.Client, vm: Vm, tmp_path: Path) -> None:
    assert vm.status_detail == "ready"
    assert [v.id for v in sdk.vms.iter(name=vm.name)] == [vm.id]
    assert any(i.default for i in sdk.images.list().data)

    result = sdk.vms.exec(
        vm.id,
        ["sh", "-c", 'echo "$GREETING from $(pwd)"; echo oops >&2; exit 3'],
        env={"GREETING": "hi"},
        cwd="/tmp",
    )
    assert (result.exit_code, result.stdout, result.stderr) == (3, "hi from /tmp\n", "oops\n")
    assert sdk.vms.exec(vm.id, "sleep 5", timeout=0.5).timed_out

    with sdk.vms.exec_stream(
        vm.id, "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.05; done; exit 7"
    ) as stream:
        events = list(stream)
    out = "".join(e.data for e in events if isinstance(e, ExecOutput) and e.stream == "stdout")
    err = "".join(e.data for e in events if isinstance(e, ExecOutput) and e.stream == "stderr")
    assert (out, err) == ("out1\nout2\nout3\n", "err1\nerr2\nerr3\n")
    assert isinstance(events[-1], ExecExit)
    assert stream.exit is not None
    assert stream.exit.exit_code == 7

    payload = bytes(range(256)) * 4096  # 1 MiB
    local = tmp_path / "payload.bin"
    local.write_bytes(payload)
    assert sdk.vms.upload(vm.id, "/root/up/from-path.bin", local, mode=0o600).size == len(payload)
    assert sdk.vms.upload(vm.id, "/root/up/from-file.txt", io.BytesIO(b"file object\n")).size == 12
    assert sh(
        sdk, vm.id, "sha256sum /root/up/from-path.bin | cut -c1-16; stat -c %a /root/up/from-path.bin"
    ) == (hashlib.sha256(payload).hexdigest()[:16] + "\n600\n")
    sh(sdk, vm.id, "echo made inside > /root/up/inside.txt")
    assert sdk.vms.download(vm.id, "/root/up/inside.txt") == b"made inside\n"
    assert sdk.vms.download_to(vm.id, "/root/up/from-path.bin", tmp_path / "back.bin") == len(payload)
    assert (tmp_path / "back.bin").read_bytes() == payload
    listing = sdk.vms.list_files(vm.id, "/root/up")
    assert [(e.name, e.type) for e in listing.data] == [
        ("from-file.txt", "file"),
        ("from-path.bin", "file"),
        ("inside.txt", "file"),
    ]
    with pytest.raises(corral.NotFoundError) as err404:
        sdk.vms.download(vm.id, "/root/up/nothing")
    assert err404.value.code == "file_not_found"

    info = sdk.vms.ssh(vm.id)
    assert info.username == vm.id
    assert info.port > 0
    assert str(info.port) in info.command


def test_errors_carry_the_api_codes(sdk: corral.Client, vm: Vm, node: Server) -> None:
    with pytest.raises(corral.NotFoundError) as missing:
        sdk.vms.get("vm_doesnotexist")
    assert missing.value.code == "vm_not_found"
    with pytest.raises(corral.ConflictError) as taken:
        sdk.vms.create(name=vm.name, public_key=public_key())
    assert taken.value.code == "vm_name_taken"
    with pytest.raises(corral.ConflictError) as running:
        sdk.vms.destroy(vm.id)
    assert running.value.code == "vm_not_stopped"
    stranger = signup(node)
    stranger.client.close()
    with corral.Client(stranger.token, node.url) as other, pytest.raises(corral.NotFoundError):
        other.vms.exec(vm.id, "true")  # another user's VM does not exist for them


def test_proxy_to_a_server_inside(sdk: corral.Client, vm: Vm) -> None:
    sh(
        sdk,
        vm.id,
        "mkdir -p /root/www && echo served > /root/www/index.txt && cd /root/www && "
        "nohup python3 -m http.server 8124 --bind 127.0.0.1 >/dev/null 2>&1 & echo $! > /root/www.pid",
    )
    resp = sdk.vms.proxy(vm.id, 8124, "/index.txt")
    for _ in range(50):
        if resp.status_code == 200:
            break
        time.sleep(0.1)  # the server inside is still starting
        resp = sdk.vms.proxy(vm.id, 8124, "/index.txt")
    assert (resp.status_code, resp.content) == (200, b"served\n")
    assert sdk.vms.proxy(vm.id, 8124, "/missing").status_code == 404  # the guest's own answer, not raised
    closed = sdk.vms.proxy(vm.id, 8125, "/")
    assert closed.status_code == 502
    assert closed.json()["error"]["code"] == "upstream_unreachable"
    sh(sdk, vm.id, "kill $(cat /root/www.pid)")  # CRIU cannot dump its socket (the state test runs next)


def test_async_client_on_a_live_vm(sdk: corral.Client, vm: Vm, node: Server) -> None:
    async def main() -> tuple[list[str], bytes, str]:
        async with corral.AsyncClient(sdk.config.api_key, node.url) as c:
            got = await c.vms.get(vm.id)
            assert got.id == vm.id
            stream = await c.vms.exec_stream(vm.id, "for i in 1 2 3; do echo $i; done")
            async with stream:
                chunks = [e.data async for e in stream if isinstance(e, ExecOutput)]
            assert stream.exit is not None
            assert stream.exit.exit_code == 0
            # several calls at once on one client
            results = await asyncio.gather(
                *(c.vms.exec(vm.id, f"echo {i} > /root/async-{i}; cat /root/async-{i}") for i in range(4))
            )
            assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
            await c.vms.upload(vm.id, "/root/async.txt", b"async upload")
            data = await c.vms.download(vm.id, "/root/async.txt")
            ls = await c.vms.list_files(vm.id, "/root")
            return chunks, data, ",".join(e.name for e in ls.data if e.name.startswith("async"))

    chunks, data, names = asyncio.run(main())
    assert "".join(chunks) == "1\n2\n3\n"
    assert data == b"async upload"
    assert names == "async-0,async-1,async-2,async-3,async.txt"
    assert sh(sdk, vm.id, "cat /root/async.txt") == "async upload"


def test_shell_and_terminal_through_the_sdk(sdk: corral.Client, vm: Vm, node: Server) -> None:
    with sdk.vms.shell(vm.id) as shell:
        assert shell.run("cd /tmp && export N=6").exit_code == 0
        got = shell.run("echo $((N*7)) $PWD; echo e >&2; (exit 2)")
        assert (got.stdout, got.stderr, got.exit_code) == ("42 /tmp\n", "e\n", 2)
        assert shell.run("sleep 5", timeout=0.3).timed_out
        with pytest.raises(corral.ValidationError):
            shell.run("x", timeout=-1)
    term = sdk.vms.terminal(vm.id, cols=70, rows=21)
    with term:
        term.send(b"stty size; echo Z-$((8*8)); exit 3\n")
        screen, end = b"", None
        while end is None:
            message = term.recv(timeout=15)
            if isinstance(message, bytes):
                screen += message
            else:
                end = message
        assert b"21 70" in screen
        assert b"Z-64" in screen
        assert '"exit_code": 3' in end

    async def main() -> str:
        async with corral.AsyncClient(sdk.config.api_key, node.url) as c, c.vms.shell(vm.id) as ash:
            await ash.run("cd /etc")
            return (await ash.run("pwd")).stdout

    assert asyncio.run(main()) == "/etc\n"
    with pytest.raises(corral.NotFoundError):
        sdk.vms.shell("vm_nosuchvm000")


def test_state_through_the_sdk(sdk: corral.Client, vm: Vm) -> None:
    sh(sdk, vm.id, COUNTER + "; echo before > /root/mark")
    pid = sh(sdk, vm.id, "cat /root/counter.pid").strip()

    # checkpoint, change things, roll back: the file and the process are as they were
    ckpt = sdk.vms.checkpoint(vm.id, "before-change")
    assert ckpt.memory
    assert [c.id for c in sdk.checkpoints.list(vm.id).data] == [ckpt.id]
    assert sdk.checkpoints.get(vm.id, ckpt.id).name == "before-change"
    sh(sdk, vm.id, "echo after > /root/mark")
    assert sdk.vms.rollback(vm.id, ckpt.id).status == "running"
    assert sh(sdk, vm.id, f"cat /root/mark; kill -0 {pid} && echo alive") == "before\nalive\n"
    sdk.checkpoints.delete(vm.id, ckpt.id)
    with pytest.raises(corral.NotFoundError):
        sdk.checkpoints.get(vm.id, ckpt.id)

    # hibernate and resume: the counter process comes back and goes on counting
    assert sdk.vms.hibernate(vm.id).status_detail == "hibernated"
    with pytest.raises(corral.ConflictError) as asleep:
        sdk.vms.exec(vm.id, "true")
    assert asleep.value.code == "vm_not_running"
    sdk.vms.resume(vm.id)
    ready = sdk.vms.wait_ready(vm.id)
    assert ready.status_detail == "ready"
    first = int(sh(sdk, vm.id, f"kill -0 {pid} && cat /root/count"))
    assert int(sh(sdk, vm.id, "sleep 0.2; cat /root/count")) > first

    # a snapshot, and a VM booted from it with the file and the process
    snap = sdk.snapshots.create(vm.id, label="sdk")
    snap = sdk.snapshots.wait_ready(snap.id, timeout=120)
    assert snap.status == "ready"
    assert snap.size_bytes
    assert [s.id for s in sdk.snapshots.list_for_vm(vm.id).data] == [snap.id]
    assert snap.id in {s.id for s in sdk.snapshots.iter()}
    booted = sdk.vms.create(name=unique_name("sdk-snap"), public_key=public_key(), snapshot_id=snap.id)
    booted = sdk.vms.wait_ready(booted.id, timeout=120)
    assert booted.snapshot_id == snap.id
    assert sh(sdk, booted.id, f"cat /root/mark; kill -0 {pid} && echo alive") == "before\nalive\n"

    # fork: a child with the same memory and disk, then its own
    (child,) = sdk.vms.fork(booted.id, count=1)
    assert child.id != booted.id
    sh(sdk, child.id, "echo child > /root/mark")
    assert sh(sdk, child.id, f"cat /root/mark; kill -0 {pid} && echo alive") == "child\nalive\n"
    assert sh(sdk, booted.id, "cat /root/mark") == "before\n"

    # a timer reset, then stop and destroy; the destroyed VMs are in the history
    assert sdk.vms.reset_timer(vm.id, 1800).timeout == 1800
    for done in (child, booted):
        assert sdk.vms.stop(done.id).status == "stopped"
        sdk.vms.destroy(done.id)
        assert sdk.vms.get(done.id).status == "destroyed"
    history = {h.id: h for h in sdk.vms.iter_history()}
    assert {child.id, booted.id} <= history.keys()
    assert history[booted.id].cost_cents >= 0
    sdk.snapshots.delete(snap.id)
    with pytest.raises(corral.NotFoundError) as gone:
        sdk.snapshots.get(snap.id)
    assert gone.value.code == "snapshot_not_found"
