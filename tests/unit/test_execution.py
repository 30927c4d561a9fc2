"""Running a command: the shell wrapper, finding a command's process tree, and streaming its output with a
timeout. No sandbox: a fake spawner runs the command on this host in a new session, as the runtime would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from corral.node.execution import (
    TIMEOUT_EXIT_CODE,
    Event,
    Exit,
    Output,
    run_streaming,
    shell_argv,
    tree_of,
)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _all_pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def _session_members(sid: int) -> set[int]:
    """Live (not zombie) processes in session ``sid``."""
    found = set()
    for pid in _all_pids():
        fields = _stat(pid)
        if fields is not None and fields[0] != "Z" and int(fields[3]) == sid:
            found.add(pid)
    return found


def _children(pid: int) -> set[int]:
    found = set()
    for p in _all_pids():
        fields = _stat(p)
        if fields is not None and int(fields[1]) == pid:
            found.add(p)
    return found


def _escaped(leader: int) -> set[int]:
    """The leader's children that lead a session of their own."""
    return {p for p in _children(leader) if (f := _stat(p)) is not None and int(f[3]) == p}


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def wait_for(check: Callable[[], bool], deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            pytest.fail("condition not reached before the deadline")
        time.sleep(0.01)


@pytest.fixture
def killer() -> Iterator[list[int]]:
    """PIDs to SIGKILL at the end of the test (whatever happened), with their sessions, and every process
    that carries this module's environment mark (a child that escaped by ``setsid`` while its parent died)."""
    pids: list[int] = []
    yield pids
    for pid in {*pids, *(m for p in pids for m in _session_members(p)), *_marked()}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


MARK = f"CORRAL_TEST_EXEC_{os.getpid()}"


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    """Whatever a test started (and marked) is gone after it."""
    yield
    for pid in _marked():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _marked() -> set[int]:
    """Processes started by this test module (their environment holds MARK)."""
    found: set[int] = set()
    needle = f"{MARK}=1".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.add(int(entry))
    return found


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=5)


# --- shell_argv -----------------------------------------------------------------------------------------


def test_a_string_runs_under_sh() -> None:
    assert shell_argv("echo hi && ls /") == ["/bin/sh", "-c", "echo hi && ls /"]
    assert shell_argv("") == ["/bin/sh", "-c", ""]


def test_a_list_runs_as_given() -> None:
    assert shell_argv(["ls", "-l", "a b"]) == ["ls", "-l", "a b"]
    assert shell_argv(("echo", "$HOME")) == ["echo", "$HOME"]
    assert shell_argv([]) == []


def test_shell_argv_copies_the_list() -> None:
    argv = ["ls"]
    out = shell_argv(argv)
    out.append("-l")
    assert argv == ["ls"]


# --- tree_of --------------------------------------------------------------------------------------------


def _start_session(
    command: str, procs: list[subprocess.Popen[bytes]], killer: list[int], children: int
) -> tuple[int, set[int]]:
    """Start ``sh -c command`` as a session leader; wait until it has ``children`` children."""
    leader = subprocess.Popen(["sh", "-c", command], start_new_session=True, env={**os.environ, MARK: "1"})
    procs.append(leader)
    wait_for(lambda: len(_children(leader.pid)) >= children)
    kids = _children(leader.pid)
    killer.extend(kids)
    return leader.pid, kids


def test_tree_of_takes_the_leaders_session(procs: list[subprocess.Popen[bytes]], killer: list[int]) -> None:
    unrelated = subprocess.Popen(["sleep", "30"])
    procs.append(unrelated)
    leader, kids = _start_session("sleep 300 & sleep 300", procs, killer, 1)
    assert kids
    candidates = _all_pids()
    tree = tree_of(leader, candidates)
    assert leader in tree
    assert kids <= tree
    assert tree == _session_members(leader)
    assert unrelated.pid not in tree
    assert os.getpid() not in tree  # the leader's parent is not part of its tree
    assert 1 not in tree


def test_tree_of_follows_children_that_left_the_session(
    procs: list[subprocess.Popen[bytes]], killer: list[int]
) -> None:
    leader, kids = _start_session("sleep 300 & setsid sleep 300 & wait", procs, killer, 2)
    wait_for(lambda: len(_escaped(leader)) == 1)  # setsid made its own session
    escaped = _escaped(leader)
    kids = _children(leader)
    killer.extend(kids)
    tree = tree_of(leader, _all_pids())
    assert kids <= tree
    assert escaped <= tree
    assert leader in tree


def test_tree_of_only_looks_at_candidates(procs: list[subprocess.Popen[bytes]], killer: list[int]) -> None:
    unrelated = subprocess.Popen(["sleep", "30"])
    procs.append(unrelated)
    leader, kids = _start_session("sleep 300 & sleep 300", procs, killer, 1)
    assert tree_of(leader, set()) == set()
    assert tree_of(leader, {unrelated.pid}) == set()
    assert tree_of(leader, kids) == kids
    assert tree_of(leader, {leader, unrelated.pid}) == {leader}


def test_tree_of_a_gone_leader_is_empty() -> None:
    proc = subprocess.Popen(["true"], start_new_session=True)
    proc.wait()
    assert tree_of(proc.pid, _all_pids()) == set()


# --- run_streaming --------------------------------------------------------------------------------------
# The host may be heavily loaded: nothing below depends on how fast the command runs. Commands sleep for
# 300 s, so finishing in well under that proves they were cut short.

SLOW = 60.0


class LocalSpawner:
    """Runs the command on this host as a session leader and writes its PID to ``pid_file`` (as ``crun exec
    --pid-file`` does); the sandbox's processes are that session's (or, with ``whole_host``, every process
    on the host: only the command's tree may be touched). ``ready(leader)`` is waited for before the spawn
    returns, so the command has set itself up before run_streaming can time it out."""

    def __init__(self, *, whole_host: bool = False, ready: Callable[[int], bool] | None = None) -> None:
        self.calls: list[dict[str, object]] = []
        self.leaders: dict[str, int] = {}
        self.whole_host = whole_host
        self.ready = ready

    def spawn_process(
        self,
        cid: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        pid_file: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        self.calls.append({"cid": cid, "args": list(args), "env": env, "cwd": cwd, "user": user})
        proc = subprocess.Popen(
            list(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={**os.environ, MARK: "1", **(env or {})},
            cwd=cwd,
        )
        self.leaders[cid] = proc.pid
        if pid_file is not None:
            pid_file.write_text(f"{proc.pid}\n")
        if self.ready is not None:
            wait_for(lambda: self.ready is not None and self.ready(proc.pid))
        return proc

    def sandbox_pids(self, cid: str) -> set[int]:
        if self.whole_host:
            return _all_pids()
        return _session_members(self.leaders[cid])


def _run(spawner: LocalSpawner, command: str, **kwargs: object) -> list[Event]:
    return list(run_streaming(spawner, "vm_test", shell_argv(command), **kwargs))  # type: ignore[arg-type]


def _exit(events: list[Event]) -> Exit:
    assert isinstance(events[-1], Exit)
    assert not [e for e in events[:-1] if isinstance(e, Exit)]
    return events[-1]


def _joined(events: list[Event], stream: str) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Output) and e.stream == stream)


def _in_session(count: int) -> Callable[[int], bool]:
    return lambda leader: len(_session_members(leader)) >= count


def test_output_arrives_in_order_as_it_is_written(tmp_path: Path) -> None:
    """Each piece is written only once the previous one has been received: chunks cannot merge or swap."""
    step = f"while [ ! -e {tmp_path}/$n ]; do sleep 0.01; done"
    command = f"printf one; n=1; {step}; printf two >&2; n=2; {step}; printf three"
    events: list[Event] = []
    for event in run_streaming(LocalSpawner(), "vm_test", shell_argv(command), timeout=SLOW):
        events.append(event)
        if isinstance(event, Output):
            (tmp_path / str(len(events))).touch()
    assert events[:-1] == [Output("stdout", b"one"), Output("stderr", b"two"), Output("stdout", b"three")]
    end = _exit(events)
    assert end.exit_code == 0
    assert not end.timed_out
    assert end.duration_ms >= 0


def test_duration_is_measured() -> None:
    end = _exit(_run(LocalSpawner(), "sleep 0.3", timeout=SLOW))
    assert (end.exit_code, end.timed_out) == (0, False)
    assert 300 <= end.duration_ms < SLOW * 1000


def test_large_output_is_complete() -> None:
    events = _run(LocalSpawner(), "head -c 1000000 /dev/zero; head -c 300000 /dev/zero >&2", timeout=SLOW)
    assert (len(_joined(events, "stdout")), len(_joined(events, "stderr"))) == (1_000_000, 300_000)
    assert _exit(events).exit_code == 0


@pytest.mark.parametrize(("command", "code"), [("exit 0", 0), ("exit 3", 3), ("false", 1), ("exit 255", 255)])
def test_exit_codes(command: str, code: int) -> None:
    events = _run(LocalSpawner(), command, timeout=SLOW)
    assert events == [Exit(code, False, _exit(events).duration_ms)]


def test_death_by_signal_is_128_plus_the_signal() -> None:
    end = _exit(_run(LocalSpawner(), "kill -9 $$", timeout=SLOW))
    assert (end.exit_code, end.timed_out) == (128 + 9, False)
    end = _exit(_run(LocalSpawner(), "kill -TERM $$", timeout=SLOW))
    assert end.exit_code == 128 + 15


def test_the_spawner_gets_the_call(tmp_path: Path) -> None:
    spawner = LocalSpawner()
    argv = ["sh", "-c", 'printf "%s %s" "$GREETING" "$(pwd)"']
    events = list(
        run_streaming(
            spawner,
            "vm_abc",
            argv,
            env={"GREETING": "hello"},
            cwd=str(tmp_path),
            user="1000:1000",
            timeout=SLOW,
        )
    )
    assert _joined(events, "stdout") == f"hello {tmp_path}".encode()
    assert spawner.calls == [
        {
            "cid": "vm_abc",
            "args": argv,
            "env": {"GREETING": "hello"},
            "cwd": str(tmp_path),
            "user": "1000:1000",
        }
    ]


def test_a_timeout_kills_the_whole_session(killer: list[int]) -> None:
    spawner = LocalSpawner(ready=_in_session(2))  # the shell (or the sleep it became) and the background one
    start = time.monotonic()
    gen = run_streaming(spawner, "vm_test", shell_argv("echo started; sleep 300 & sleep 300"), timeout=0.5)
    first = next(gen)
    leader = spawner.leaders["vm_test"]
    killer.append(leader)
    members = _session_members(leader)
    killer.extend(members)
    events = [first, *gen]
    took = time.monotonic() - start
    assert _joined(events, "stdout") == b"started\n"  # what was written before the timeout is not lost
    end = _exit(events)
    assert end.exit_code == TIMEOUT_EXIT_CODE == 124
    assert end.timed_out
    assert 500 <= end.duration_ms < SLOW * 1000
    assert took < SLOW
    wait_for(lambda: not _session_members(leader))
    assert not any(_alive(p) for p in members)


def test_a_timeout_with_no_output(killer: list[int]) -> None:
    spawner = LocalSpawner(ready=_in_session(2))
    events = _run(spawner, "sleep 300 & sleep 300", timeout=0.5)
    leader = spawner.leaders["vm_test"]
    killer.append(leader)
    # nothing but what the shell may say if its child dies first ("Killed")
    assert all(isinstance(e, Output) and e.stream == "stderr" for e in events[:-1])
    end = _exit(events)
    assert (end.exit_code, end.timed_out) == (124, True)
    wait_for(lambda: not _session_members(leader))


def test_a_timeout_kills_escaped_children_and_nothing_else(
    procs: list[subprocess.Popen[bytes]], killer: list[int]
) -> None:
    """With every host process as a candidate, only the command's tree dies: a child that made its own
    session is followed by parentage, an unrelated process is left alone."""
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    procs.append(bystander)
    spawner = LocalSpawner(whole_host=True, ready=lambda leader: len(_escaped(leader)) == 1)
    gen = run_streaming(spawner, "vm_test", shell_argv("setsid sleep 300 & sleep 300"), timeout=0.5)
    assert isinstance(gen, Generator)  # closed like a client that goes away
    try:
        assert spawner.leaders == {}  # nothing runs before the generator is started
        events = [next(gen)]
        leader = spawner.leaders["vm_test"]
        killer.append(leader)
        escaped = _escaped(leader)
        killer.extend(escaped)
        events += list(gen)
    finally:
        gen.close()
    end = _exit(events)
    assert (end.exit_code, end.timed_out) == (124, True)
    wait_for(lambda: not any(_alive(p) for p in escaped))
    assert _alive(bystander.pid)


def test_closing_the_stream_kills_the_command(killer: list[int]) -> None:
    """A client that goes away (the generator is closed) leaves nothing running."""
    spawner = LocalSpawner(ready=_in_session(2))
    gen = run_streaming(spawner, "vm_test", shell_argv("echo hi; sleep 300 & sleep 300"), timeout=SLOW)
    assert isinstance(gen, Generator)  # closed like a client that goes away
    assert next(gen) == Output("stdout", b"hi\n")
    leader = spawner.leaders["vm_test"]
    killer.append(leader)
    start = time.monotonic()
    gen.close()
    assert time.monotonic() - start < SLOW
    wait_for(lambda: not _session_members(leader))


def test_the_pid_file_lives_in_a_private_temporary_directory() -> None:
    seen: list[Path] = []

    class Recording(LocalSpawner):
        def spawn_process(
            self,
            cid: str,
            args: Sequence[str],
            *,
            env: Mapping[str, str] | None = None,
            cwd: str | None = None,
            user: str | None = None,
            pid_file: Path | None = None,
        ) -> subprocess.Popen[bytes]:
            assert pid_file is not None
            seen.append(pid_file)
            return super().spawn_process(cid, args, env=env, cwd=cwd, user=user, pid_file=pid_file)

    _run(Recording(), "true", timeout=SLOW)
    assert len(seen) == 1
    assert seen[0].name == "pid"
    assert seen[0].parent.name.startswith("corral-exec-")
    assert not seen[0].parent.exists()  # removed afterwards
