"""Exec in real sandboxes through the API: output, exit codes, environment, timeouts, streaming."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.support import Account, node_server, signup
from tests.vmtools import create_ready, destroy, run


def test_exec_runs_in_the_sandbox_with_the_owners_env(owner: Account) -> None:
    c = owner.client
    assert c.put("/v1/env/GREETING", json={"value": "hello from env"}).status_code == 200
    vm = create_ready(c)
    try:
        out = run(c, vm["id"], 'echo "$GREETING"; echo oops >&2; exit 7')
        assert out["exit_code"] == 7
        assert out["stdout"] == "hello from env\n"
        assert out["stderr"] == "oops\n"
        assert out["timed_out"] is False
        argv = run(
            c,
            vm["id"],
            ["python3", "-c", "import os,sys; print(os.getcwd(), os.environ['X'], sys.argv)"],
            env={"X": "1"},
            cwd="/tmp",
        )
        assert argv["stdout"] == "/tmp 1 ['-c']\n", argv
        who = run(c, vm["id"], "id -u; id -g", user="nobody")
        assert who["stdout"].split() == ["65534", "65534"]
    finally:
        destroy(c, vm["id"])


def test_timeout_kills_the_whole_process_tree(owner: Account) -> None:
    c = owner.client
    vm = create_ready(c)
    try:
        start = time.monotonic()
        out = run(c, vm["id"], "sleep 300 & (sleep 301; echo never) & sleep 302", timeout=1)
        assert out["timed_out"] is True
        assert out["exit_code"] == 124
        assert time.monotonic() - start < 10
        left = run(c, vm["id"], "ps -eo comm= | grep -c '^sleep' || true")
        assert left["stdout"].strip() == "0", left
    finally:
        destroy(c, vm["id"])


def test_stream_delivers_output_as_it_is_written(owner: Account) -> None:
    c = owner.client
    vm = create_ready(c)
    try:
        body = {"command": "for i in 1 2 3; do echo line$i; sleep 0.3; done; echo bad >&2; exit 3"}
        seen: list[tuple[float, str, dict[str, object]]] = []
        start = time.monotonic()
        with c.stream("POST", f"/v1/vms/{vm['id']}/exec/stream", json=body) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            event = ""
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    seen.append((time.monotonic() - start, event, json.loads(line[6:])))
        stdout = [(t, d["data"]) for t, e, d in seen if e == "stdout"]
        assert "".join(str(d) for _, d in stdout) == "line1\nline2\nline3\n"
        assert stdout[0][0] < 0.5, "the first line must arrive before the command ends (~0.9 s)"
        assert [d for _, e, d in seen if e == "stderr"] == [{"data": "bad\n"}]
        assert seen[-1][1] == "exit"
        assert seen[-1][2]["exit_code"] == 3
    finally:
        destroy(c, vm["id"])


def test_without_corral_init_commands_go_through_the_runtime(tmp_path: Path) -> None:
    """With catatonit as pid 1 (no corral-init), exec uses `crun exec`: same answers, same containment."""
    with node_server(tmp_path, CORRAL_SANDBOX_INIT="/usr/bin/catatonit") as srv:
        acct = signup(srv)
        c = acct.client
        vm = create_ready(c)
        try:
            out = run(
                c,
                vm["id"],
                "cat /proc/1/cmdline | tr '\\0' ' '; grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status",
            )
            assert out["stdout"].splitlines() == ["/.corral/init -P NoNewPrivs:\t1", "Seccomp:\t2"], out
            assert not (srv.data_dir / "node" / "bundles" / vm["id"] / "agent.sock").exists()
            slow = run(c, vm["id"], "sleep 300 & sleep 301", timeout=1)
            assert slow["timed_out"] is True
            assert run(c, vm["id"], "ps -eo comm= | grep -c '^sleep' || true")["stdout"] == "0\n"
            assert run(c, vm["id"], "id -u", user="nobody")["stdout"] == "65534\n"
            # the runtime chowns the stdio it is given: never the host's /dev/null
            host = os.stat("/dev/null")
            assert (host.st_uid, host.st_gid, host.st_mode & 0o777) == (0, 0, 0o666)
        finally:
            destroy(c, vm["id"])
            c.close()
