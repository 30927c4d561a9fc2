"""What the proxy decides with, read from the store: every live VM's policy (account mode and rules with the
VM's overrides) and its owner's secrets, decrypted. Reloaded in the background about twice a second and
swapped in whole, so a decision never waits on the database and a change through the API applies to new
connections within a second."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from corral.domain.egress_policy import ENFORCE, Policy, Rule, effective
from corral.domain.vm_states import Detail
from corral.egress.inject import SecretEntry
from corral.egress.limits import Throttle, held_note
from corral.security.secretbox import Cipher
from corral.services.secrets import proxy_value
from corral.store.tables import EgressPolicy, EgressRule, Secret, Vm

log = logging.getLogger(__name__)

RELOAD_SECONDS = 0.5
FAILURE_LOG_EVERY = 60.0  # a reload that keeps failing is logged once a minute, with the count
# VMs whose sandbox may be running (a pool hand-over makes a VM ``queued`` with its sandbox up)
_LIVE = [d.value for d in (Detail.QUEUED, Detail.CREATING, Detail.STARTING, Detail.RUNNING, Detail.READY)]


@dataclass(frozen=True)
class VmEntry:
    vm_id: str
    user_id: str
    policy: Policy
    secrets: tuple[SecretEntry, ...]


@dataclass(frozen=True)
class Snapshot:
    vms: dict[str, VmEntry] = field(default_factory=dict)

    def get(self, vm_id: str) -> VmEntry | None:
        return self.vms.get(vm_id)


def load(session: Session, cipher: Cipher) -> Snapshot:
    vms = list(
        session.execute(
            select(Vm.id, Vm.user_id, Vm.egress_mode, Vm.egress_rules).where(Vm.status_detail.in_(_LIVE))
        )
    )
    users = {row.user_id for row in vms}
    if not users:
        return Snapshot()
    modes = {
        row.user_id: row.mode
        for row in session.execute(
            select(EgressPolicy.user_id, EgressPolicy.mode).where(EgressPolicy.user_id.in_(users))
        )
    }
    rules: dict[str, list[Rule]] = {u: [] for u in users}
    for r in session.execute(
        select(EgressRule.user_id, EgressRule.host, EgressRule.cidr).where(EgressRule.user_id.in_(users))
    ):
        rules[r.user_id].append(Rule(r.host, r.cidr))
    secrets: dict[str, list[SecretEntry]] = {u: [] for u in users}
    for s in session.scalars(select(Secret).where(Secret.user_id.in_(users))):
        try:
            value = cipher.decrypt(s.ciphertext, f"secret:{s.user_id}:{s.id}").reveal()
        except Exception:
            log.error("secret %s cannot be decrypted (wrong key file?); it is not injected", s.id)
            continue
        secrets[s.user_id].append(SecretEntry(s.name, proxy_value(s.name), value, tuple(json.loads(s.hosts))))
    out: dict[str, VmEntry] = {}
    for row in vms:
        own = [Rule(r.get("host"), r.get("cidr")) for r in json.loads(row.egress_rules or "[]")]
        policy = effective(modes.get(row.user_id, ENFORCE), rules[row.user_id], row.egress_mode, own)
        out[row.id] = VmEntry(row.id, row.user_id, policy, tuple(secrets[row.user_id]))
    return Snapshot(out)


class StateWatcher:
    """Keeps ``current`` fresh: a reload every ``interval`` seconds, and ``refresh_soon`` for a miss."""

    def __init__(
        self,
        loader: Callable[[], Snapshot],
        interval: float = RELOAD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loader = loader
        self._interval = interval
        self._clock = clock
        self.current = Snapshot()
        self.loaded_at: float | None = None  # when the last successful read began
        self.failures = 0  # reads failed in a row
        self._throttle = Throttle(FAILURE_LOG_EVERY, clock)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._loaded = threading.Condition()
        self._snapshot_started = 0.0  # when the read that made ``current`` began
        self._thread = threading.Thread(target=self._loop, name="egress-state", daemon=True)

    @classmethod
    def from_store(
        cls,
        sessions: sessionmaker[Session],
        cipher: Cipher,
        interval: float = RELOAD_SECONDS,
        call: Callable[[Callable[[], Snapshot]], Snapshot] = lambda fn: fn(),
    ) -> StateWatcher:
        """Read from the store; ``call`` runs each read (in the host's network namespace, see main.py)."""

        def loader() -> Snapshot:
            with sessions() as session:
                return load(session, cipher)

        return cls(lambda: call(loader), interval)

    def age(self) -> float:
        """Seconds since the policy in use was read (infinite before the first read succeeded)."""
        return float("inf") if self.loaded_at is None else self._clock() - self.loaded_at

    def start(self) -> None:
        self.reload()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def reload(self) -> None:
        started = self._clock()
        try:
            snapshot = self._loader()
        except Exception as exc:
            self.failures += 1
            held = self._throttle.due()
            if held is not None:  # the first failure with its traceback, then one line a minute
                log.error(
                    "reading the egress policy failed (%d in a row: %s); keeping the last one%s",
                    self.failures,
                    f"{type(exc).__name__}: {str(exc)[:300]}",
                    held_note(held),
                    exc_info=self.failures == 1,
                )
            return
        if self.failures:
            log.info("reading the egress policy works again after %d failures", self.failures)
            self.failures = 0
            self._throttle = Throttle(FAILURE_LOG_EVERY, self._clock)
        with self._loaded:
            if started >= self._snapshot_started:
                self.current = snapshot
                self._snapshot_started = started
                self.loaded_at = started
            self._loaded.notify_all()

    def refresh_soon(self) -> None:
        self._wake.set()

    def wait_next(self, timeout: float) -> Snapshot:
        """Ask for a reload and wait (bounded) for a snapshot read after this call: for a sandbox not known
        yet (one read that began earlier may not have seen its VM)."""
        asked = self._clock()
        with self._loaded:
            self._wake.set()
            self._loaded.wait_for(lambda: self._snapshot_started >= asked, timeout=timeout)
            return self.current

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.reload()
