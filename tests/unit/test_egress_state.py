"""What the proxy decides with: ``load`` against a real (SQLite) store made by the project's migrations, and
the ``StateWatcher`` that keeps a snapshot fresh in the background."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from corral.domain.egress_policy import ENFORCE, WARN, Policy, Rule, effective
from corral.domain.vm_states import Detail
from corral.egress.inject import SecretEntry
from corral.egress.state import Snapshot, StateWatcher, VmEntry, load
from corral.security.secretbox import AesGcmCipher, SecretValue
from corral.store.db import make_engine, migrate, session_factory
from corral.store.tables import EgressPolicy, EgressRule, Secret, User, Vm
from tests.support import wait_until

CIPHER = AesGcmCipher(bytes(range(32)))
OTHER_KEY = AesGcmCipher(bytes(range(1, 33)))
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LIVE = {Detail.QUEUED, Detail.CREATING, Detail.STARTING, Detail.RUNNING, Detail.READY}


# --- a store ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database file at the newest schema, migrated once for the module (each test copies it)."""
    path = tmp_path_factory.mktemp("egress-state") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    engine.dispose()  # checkpoints the WAL: the file alone is the database
    return path


@pytest.fixture
def engine(migrated: Path, tmp_path: Path) -> Iterator[Engine]:
    path = tmp_path / "corral.db"
    shutil.copy(migrated, path)
    eng = make_engine(f"sqlite:///{path}")
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


def add_user(session: Session, user_id: str, mode: str | None = None) -> None:
    session.add(
        User(
            id=user_id,
            first_name="A",
            last_name="B",
            email=f"{user_id}@example.org",
            password_hash="x",
            email_verified=True,
            created_at=NOW,
        )
    )
    session.flush()  # no relationship() tells the unit of work that the user goes first
    if mode is not None:
        session.add(EgressPolicy(user_id=user_id, mode=mode, updated_at=NOW))


def add_vm(
    session: Session,
    vm_id: str,
    user_id: str,
    status: Detail = Detail.RUNNING,
    mode: str | None = None,
    rules: list[dict[str, str]] | None = None,
) -> None:
    session.add(
        Vm(
            id=vm_id,
            user_id=user_id,
            name=vm_id,
            public_key="ssh-ed25519 AAAA",
            status_detail=status.value,
            image="debian",
            vcpus=1,
            mem_mib=256,
            disk_mib=1024,
            egress_mode=mode,
            egress_rules=None if rules is None else json.dumps(rules),
            created_at=NOW,
            updated_at=NOW,
        )
    )


def add_rule(
    session: Session, rule_id: str, user_id: str, host: str | None = None, cidr: str | None = None
) -> None:
    session.add(EgressRule(id=rule_id, user_id=user_id, name=rule_id, host=host, cidr=cidr, created_at=NOW))


def add_secret(
    session: Session,
    secret_id: str,
    user_id: str,
    name: str,
    value: str,
    hosts: list[str],
    *,
    cipher: AesGcmCipher = CIPHER,
    context_user: str | None = None,
) -> None:
    context = f"secret:{context_user or user_id}:{secret_id}"
    session.add(
        Secret(
            id=secret_id,
            user_id=user_id,
            name=name,
            env_var=name.upper(),
            hosts=json.dumps(hosts),
            ciphertext=cipher.encrypt(SecretValue(value), context),
            created_at=NOW,
            updated_at=NOW,
        )
    )


def snapshot(sessions: sessionmaker[Session]) -> Snapshot:
    with sessions() as session:
        return load(session, CIPHER)


@pytest.fixture
def populated(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    """usr_a: no policy row (enforce), two rules, VMs in every status (one with overrides), three secrets
    of which only one decrypts; usr_b: warn, a wildcard rule, a secret; usr_c: enforce, only dead VMs."""
    with sessions() as s, s.begin():
        add_user(s, "usr_a")
        add_user(s, "usr_b", WARN)
        add_user(s, "usr_c", ENFORCE)
        for status in Detail:
            add_vm(s, f"vm_a_{status.value}", "usr_a", status)
        add_vm(
            s, "vm_a_own", "usr_a", Detail.READY, WARN, [{"host": "*.github.com"}, {"cidr": "203.0.113.0/24"}]
        )
        add_vm(s, "vm_a_empty", "usr_a", Detail.RUNNING, None, [])
        add_vm(s, "vm_b", "usr_b")
        add_vm(s, "vm_b_strict", "usr_b", Detail.STARTING, ENFORCE)
        add_vm(s, "vm_c_stopped", "usr_c", Detail.STOPPED)
        add_vm(s, "vm_c_failed", "usr_c", Detail.FAILED)
        add_rule(s, "egr_1", "usr_a", host="api.example.org")
        add_rule(s, "egr_2", "usr_a", cidr="10.1.0.0/16")
        add_rule(s, "egr_3", "usr_b", host="*.pypi.org")
        add_rule(s, "egr_4", "usr_c", host="c.example.org")
        add_secret(s, "sec_1", "usr_a", "openai", "sk-live-openai", ["api.openai.com"])
        add_secret(s, "sec_2", "usr_a", "stale", "sk-stale", ["*"], cipher=OTHER_KEY)  # another key file
        add_secret(s, "sec_3", "usr_a", "moved", "sk-moved", ["*"], context_user="usr_b")  # another row's
        add_secret(s, "sec_4", "usr_b", "gh", "ghp_github", ["*.github.com", "github.com"])
        add_secret(s, "sec_5", "usr_c", "c", "sk-c", ["*"])
    return sessions


# --- load ------------------------------------------------------------------------------------------------


def test_an_empty_store_loads_an_empty_snapshot(sessions: sessionmaker[Session]) -> None:
    assert snapshot(sessions) == Snapshot()


def test_no_live_vm_loads_an_empty_snapshot(sessions: sessionmaker[Session]) -> None:
    with sessions() as s, s.begin():
        add_user(s, "usr_a")
        add_vm(s, "vm_1", "usr_a", Detail.STOPPED)
        add_rule(s, "egr_1", "usr_a", host="api.example.org")
    assert snapshot(sessions).vms == {}


def test_only_live_vms_appear(populated: sessionmaker[Session]) -> None:
    snap = snapshot(populated)
    assert set(snap.vms) == {f"vm_a_{d.value}" for d in LIVE} | {
        "vm_a_own",
        "vm_a_empty",
        "vm_b",
        "vm_b_strict",
    }
    for dead in (
        "vm_a_stopped",
        "vm_a_stopping",
        "vm_a_destroying",
        "vm_a_destroyed",
        "vm_a_failed",
        "vm_c_stopped",
    ):
        assert snap.get(dead) is None
    assert snap.get("vm_nope") is None


@pytest.mark.parametrize("status", sorted(LIVE))
def test_each_live_status_counts(sessions: sessionmaker[Session], status: Detail) -> None:
    with sessions() as s, s.begin():
        add_user(s, "usr_a")
        add_vm(s, "vm_1", "usr_a", status)
    assert set(snapshot(sessions).vms) == {"vm_1"}


def test_account_mode_and_rules(populated: sessionmaker[Session]) -> None:
    snap = snapshot(populated)
    a = snap.vms["vm_a_running"]
    assert (a.vm_id, a.user_id) == ("vm_a_running", "usr_a")
    assert a.policy == Policy.build(ENFORCE, [Rule(host="api.example.org"), Rule(cidr="10.1.0.0/16")])
    b = snap.vms["vm_b"]
    assert b.policy == Policy.build(WARN, [Rule(host="*.pypi.org")])
    # rules are the owner's only
    assert not a.policy.allows_host("files.pypi.org")
    assert not b.policy.allows_host("api.example.org")
    assert not a.policy.allows_host("c.example.org")


def test_vm_overrides(populated: sessionmaker[Session]) -> None:
    snap = snapshot(populated)
    own = snap.vms["vm_a_own"].policy
    assert own == effective(
        ENFORCE,
        [Rule(host="api.example.org"), Rule(cidr="10.1.0.0/16")],
        WARN,
        [Rule(host="*.github.com"), Rule(cidr="203.0.113.0/24")],
    )
    assert own.mode == WARN
    assert own.allows_host("api.github.com")
    assert own.allows_host("api.example.org")  # the account's rules still apply
    assert own.allows_address("203.0.113.9")
    assert snap.vms["vm_a_empty"].policy == snap.vms["vm_a_running"].policy
    assert snap.vms["vm_b_strict"].policy.mode == ENFORCE  # the VM's mode over the account's warn


def test_decrypted_secrets_of_the_owner(
    populated: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="corral.egress.state"):
        snap = snapshot(populated)
    openai = SecretEntry("openai", "CORRAL_PROXY_openai", "sk-live-openai", ("api.openai.com",))
    gh = SecretEntry("gh", "CORRAL_PROXY_gh", "ghp_github", ("*.github.com", "github.com"))
    for vm_id in ("vm_a_running", "vm_a_queued", "vm_a_own"):
        assert snap.vms[vm_id].secrets == (openai,)
    assert snap.vms["vm_b"].secrets == (gh,)
    assert snap.vms["vm_b"].secrets[0].value == "ghp_github"
    # the two that do not decrypt are skipped and logged by ID, never by value
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "sec_2" in logged
    assert "sec_3" in logged
    assert "sk-stale" not in logged
    assert "sk-moved" not in logged


def test_a_vm_whose_owner_has_no_rules_or_secrets(sessions: sessionmaker[Session]) -> None:
    with sessions() as s, s.begin():
        add_user(s, "usr_a", WARN)
        add_vm(s, "vm_1", "usr_a", Detail.CREATING)
    assert snapshot(sessions).vms == {"vm_1": VmEntry("vm_1", "usr_a", Policy.build(WARN, []), ())}


def test_a_secret_that_does_not_decrypt_under_any_key_does_not_stop_the_load(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as s, s.begin():
        add_user(s, "usr_a")
        add_vm(s, "vm_1", "usr_a")
        add_secret(s, "sec_1", "usr_a", "one", "v1", ["*"], cipher=OTHER_KEY)
    with sessions() as s, s.begin():
        row = s.get(Secret, "sec_1")
        assert row is not None
        add_secret(s, "sec_2", "usr_a", "two", "v2", ["*"])
        s.flush()
        row.ciphertext = b"\x02garbage"  # not even the format
    assert [e.name for e in snapshot(sessions).vms["vm_1"].secrets] == ["two"]


# --- StateWatcher ----------------------------------------------------------------------------------------


def marked(n: int) -> Snapshot:
    return Snapshot({f"vm_{n}": VmEntry(f"vm_{n}", "usr_1", Policy.build(ENFORCE, []), ())})


class Loader:
    """Counts its calls and returns ``marked(call number)``; raises on the calls in ``failing``."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing: set[int] = set()
        self.lock = threading.Lock()

    def __call__(self) -> Snapshot:
        with self.lock:
            self.calls += 1
            n = self.calls
        if n in self.failing:
            raise RuntimeError("the database is away")
        return marked(n)


@pytest.fixture
def watchers() -> Iterator[list[StateWatcher]]:
    started: list[StateWatcher] = []
    yield started
    for w in started:
        w.stop()


def test_start_loads_at_once(watchers: list[StateWatcher]) -> None:
    loader = Loader()
    watcher = StateWatcher(loader, interval=60)
    assert watcher.current == Snapshot()
    watchers.append(watcher)
    watcher.start()
    assert watcher.current == marked(1)


def test_reloads_every_interval(watchers: list[StateWatcher]) -> None:
    loader = Loader()
    watcher = StateWatcher(loader, interval=0.01)
    watchers.append(watcher)
    watcher.start()
    wait_until(lambda: loader.calls >= 4)
    wait_until(lambda: watcher.current != marked(1))
    assert set(watcher.current.vms) <= {f"vm_{n}" for n in range(2, loader.calls + 1)}


def test_refresh_soon_reloads_without_waiting_for_the_interval(watchers: list[StateWatcher]) -> None:
    loader = Loader()
    watcher = StateWatcher(loader, interval=60)
    watchers.append(watcher)
    watcher.start()
    watcher.refresh_soon()
    wait_until(lambda: watcher.current == marked(2))


def test_wait_next_returns_a_newer_snapshot(watchers: list[StateWatcher]) -> None:
    loader = Loader()
    watcher = StateWatcher(loader, interval=60)
    watchers.append(watcher)
    watcher.start()
    begin = time.monotonic()
    assert watcher.wait_next(5) == marked(2)
    assert watcher.wait_next(5) == marked(3)
    assert time.monotonic() - begin < 2


def test_wait_next_is_bounded(watchers: list[StateWatcher]) -> None:
    """The background thread is not running: nothing reloads, and the wait ends with the current one."""
    watcher = StateWatcher(Loader(), interval=60)
    watcher.reload()
    begin = time.monotonic()
    assert watcher.wait_next(0.05) == marked(1)
    assert time.monotonic() - begin < 1


def test_a_failing_loader_keeps_the_last_snapshot(caplog: pytest.LogCaptureFixture) -> None:
    loader = Loader()
    loader.failing = {2, 3}
    watcher = StateWatcher(loader, interval=60)
    watcher.reload()
    with caplog.at_level(logging.ERROR, logger="corral.egress.state"):
        watcher.reload()
        watcher.reload()
    assert watcher.current == marked(1)
    assert "keeping the last one" in caplog.text
    watcher.reload()
    assert watcher.current == marked(4)


def test_a_reload_that_keeps_failing_is_logged_once_a_minute_and_its_age_grows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    loader = Loader()
    loader.failing = set(range(2, 400))
    watcher = StateWatcher(loader, interval=60, clock=lambda: now[0])
    assert watcher.age() == float("inf")
    watcher.reload()
    assert watcher.age() == 0
    with caplog.at_level(logging.INFO, logger="corral.egress.state"):
        for _ in range(240):  # two minutes of reloads every 0.5 s, every one failing
            now[0] += 0.5
            watcher.reload()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2  # the first with its traceback, then one a minute with the count
    assert errors[0].exc_info is not None
    assert not errors[1].exc_info
    assert "119 more like this" in errors[1].getMessage()
    assert watcher.age() == 120.0
    assert watcher.failures == 240
    loader.failing = set()
    with caplog.at_level(logging.INFO, logger="corral.egress.state"):
        watcher.reload()
    assert watcher.age() == 0
    assert watcher.failures == 0
    assert "works again after 240 failures" in caplog.text


def test_a_failing_first_load_leaves_an_empty_snapshot(watchers: list[StateWatcher]) -> None:
    loader = Loader()
    loader.failing = {1}
    watcher = StateWatcher(loader, interval=60)
    watchers.append(watcher)
    watcher.start()
    assert watcher.current == Snapshot()
    watcher.refresh_soon()
    wait_until(lambda: watcher.current == marked(2))


def test_the_thread_keeps_going_after_a_failure(watchers: list[StateWatcher]) -> None:
    loader = Loader()
    loader.failing = {2, 3}
    watcher = StateWatcher(loader, interval=60)
    watchers.append(watcher)
    watcher.start()
    assert watcher.wait_next(0.2) == marked(1)  # call 2 failed: no new generation, the last one stays
    assert watcher.wait_next(0.2) == marked(1)
    assert watcher.wait_next(5) == marked(4)


def test_wait_next_while_a_load_fails_times_out_with_the_last(watchers: list[StateWatcher]) -> None:
    loader = Loader()
    watcher = StateWatcher(loader, interval=60)
    watchers.append(watcher)
    watcher.start()
    loader.failing = set(range(2, 1000))
    begin = time.monotonic()
    assert watcher.wait_next(0.1) == marked(1)
    assert 0.09 < time.monotonic() - begin < 2


def test_stop_ends_the_thread() -> None:
    loader = Loader()
    watcher = StateWatcher(loader, interval=0.01)
    watcher.start()
    wait_until(lambda: loader.calls >= 2)
    watcher.stop()
    calls = loader.calls
    time.sleep(0.05)
    assert loader.calls == calls


def test_wait_next_returns_a_snapshot_read_after_it_was_called(watchers: list[StateWatcher]) -> None:
    """The periodic reload has read the store (before the new VM was committed) when ``wait_next`` is
    called; ``wait_next`` must not settle for that reload's snapshot."""
    entered, hold = threading.Event(), threading.Event()
    data = {"version": 1}
    calls = 0

    def loader() -> Snapshot:
        nonlocal calls
        calls += 1
        seen = data["version"]  # the store is read here
        if calls == 2:
            entered.set()
            assert hold.wait(5)
        elif calls > 2:
            time.sleep(0.2)  # reading the store takes a while
        return marked(seen)

    watcher = StateWatcher(loader, interval=60)
    watchers.append(watcher)
    watcher.start()
    watcher.refresh_soon()  # the periodic reload, in the background
    assert entered.wait(5)
    data["version"] = 2  # the new VM is committed after that reload read the store
    result: list[Snapshot] = []
    waiter = threading.Thread(target=lambda: result.append(watcher.wait_next(5)))
    waiter.start()
    wait_until(watcher._wake.is_set)  # wait_next has taken note of the generation and asked for a reload
    hold.set()
    waiter.join(10)
    assert result == [marked(2)]


def test_from_store_reads_the_store(sessions: sessionmaker[Session], watchers: list[StateWatcher]) -> None:
    watcher = StateWatcher.from_store(sessions, CIPHER, interval=60)
    watchers.append(watcher)
    watcher.start()
    assert watcher.current == Snapshot()
    with sessions() as s, s.begin():
        add_user(s, "usr_a")
        add_vm(s, "vm_new", "usr_a", Detail.QUEUED)
    assert set(watcher.wait_next(5).vms) == {"vm_new"}
