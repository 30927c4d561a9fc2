"""The VM lifecycle: what happens on the host for each API call and in the background, with the record
moved through the transition table at each step. Database transactions are short and never held across a
host operation (SQLite serialises writers)."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from corral.domain.clock import Clock
from corral.domain.errors import BadRequest, Conflict, CorralError, NotFound
from corral.domain.ids import Prefix, new_id
from corral.domain.vm_states import EXECUTABLE, Detail
from corral.node.local import LocalNode, NodeError, Resources
from corral.node.pool import PoolKey, WarmPool
from corral.node.state import NodeState, hibernate_key
from corral.runtime.cgroup_usage import CgroupUsage, UsageReader
from corral.runtime.images import Image
from corral.services import failures, vms
from corral.services.timers import Timers
from corral.services.usage import UsageMeter
from corral.store.db import transaction
from corral.store.tables import Vm

log = logging.getLogger("corral.lifecycle")


class VmFailed(CorralError):
    status = 500
    code = "vm_failed"


class NodeUnavailable(CorralError):
    status = 503
    code = "node_unavailable"


def image_not_found(name: str) -> NotFound:
    return NotFound(
        f"No image named {name} on this node. Build it with `corral image build --name {name}` (Debian "
        f"packages) or import it with `corral image import FILE --name {name}` (an OCI layout or a docker "
        "save tarball); GET /v1/images lists the images there are.",
        code="image_not_found",
    )


def hostname_for(vm_id: str) -> str:
    return vm_id.replace("_", "-")


class StateServiceLike(Protocol):
    def close(self) -> None: ...

    def reconcile(self) -> None: ...

    def forget_vm(self, cid: str, vm_id: str) -> None: ...


# moves before which the sandbox's cgroup is read one last time (it ends, or may have ended)
_ENDS_SANDBOX = (Detail.STOPPING, Detail.HIBERNATING, Detail.ROLLING_BACK, Detail.FAILED)
# the states an expired VM is destroyed from (a running one is stopped first); others are mid-operation
_EXPIRES_FROM = (Detail.READY, Detail.RUNNING, Detail.STOPPED, Detail.FAILED, Detail.HIBERNATED)


@dataclass(frozen=True)
class Reconciled:
    adopted: int
    failed: int
    finished: int
    orphans_removed: int


class Lifecycle:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        clock: Clock,
        node: LocalNode,
        *,
        default_image: str,
        limits: vms.ResourceLimits,
        pool_size: int = 0,
        workers: int = 8,
        reads: sessionmaker[Session] | None = None,
        usage_reader: UsageReader | None = None,
        usage_interval_s: float = 30.0,
    ) -> None:
        self.sessions = sessions
        self.reads = reads or sessions
        self.clock = clock
        self.node = node
        self.default_image = default_image
        self.limits = limits
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="corral-vm")
        self._locks: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
        self._locks_guard = threading.Lock()
        self._created: dict[str, float] = {}
        # set by the state service: boots a creating VM from its snapshot; forgets a destroyed VM's states
        self.saved = NodeState(node)
        self.snapshot_boot: Callable[[Vm], None] | None = None
        self.on_destroy: Callable[[str, str], None] | None = None
        self.saved_state: StateServiceLike | None = None
        # quotas and node capacity every create is admitted against (set by the app; None: no checks)
        self.admission: vms.Admission | None = None
        # A pooled sandbox is booted under the id its VM will have (its hostname is that id), so the
        # hand-over is one database update.
        self.pool = WarmPool(
            PoolKey(default_image, limits.default_vcpus, limits.default_mem_mib, limits.default_disk_mib),
            pool_size,
            boot=self._boot_pooled,
            discard=self.node.destroy,
            new_cid=lambda: new_id(Prefix.VM),
        )
        self.meter = UsageMeter(sessions, clock, usage_reader or CgroupUsage(node.cgroup_parent))
        self.timers = Timers(
            clock,
            expire_due=self.expire_due,
            next_deadline=self.next_deadline,
            sample=self.sample_all,
            sample_interval_s=usage_interval_s,
        )

    # ---- plumbing -------------------------------------------------------------------------------------------

    def _lock_for(self, vm_id: str) -> threading.Lock:
        with self._locks_guard:  # one lock per VM while anyone holds or waits for it, then forgotten
            lock = self._locks.get(vm_id)
            if lock is None:
                lock = threading.Lock()
                self._locks[vm_id] = lock
        return lock

    @contextmanager
    def _vm_lock(self, vm_id: str) -> Iterator[None]:
        with self._lock_for(vm_id):
            yield

    def _load(self, vm_id: str) -> Vm:
        with self.reads() as session:
            row = session.get(Vm, vm_id)
        if row is None:
            raise vms.vm_not_found(vm_id)
        return row

    def _move(self, vm_id: str, target: Detail, *expect: Detail, **fields: object) -> bool:
        """Move the VM (``vms.move``), with the accounting around it: the cgroup read a last time before
        the sandbox ends, the meter started when the VM is ready; a destroyed VM's time noted."""
        if target in _ENDS_SANDBOX:
            self._account(self.meter.end, vm_id)
        if target is Detail.DESTROYED:
            fields.setdefault("destroyed_at", self.clock.now())
            fields.setdefault("expires_at", None)
        with transaction(self.sessions) as session:
            moved = vms.move(session, self.clock, vm_id, target, expect=expect or None, **fields)  # type: ignore[arg-type]
        if moved and target is Detail.READY:
            self._account(self.meter.begin, vm_id)
        return moved

    @staticmethod
    def _account(step: Callable[[str], None], vm_id: str) -> None:
        """Accounting never stands in the way of an operation: a failure is logged."""
        try:
            step(vm_id)
        except Exception:
            log.exception("accounting for %s failed", vm_id)

    def _come_up(self, vm_id: str, *, created: bool = False, **fields: object) -> None:
        """(creating ->) starting -> running -> ready, in one transaction: the sandbox runs, and a command can
        run now."""
        with transaction(self.sessions) as session:
            if created:
                vms.move(session, self.clock, vm_id, Detail.STARTING, expect=[Detail.CREATING])
            vms.move(session, self.clock, vm_id, Detail.RUNNING, expect=[Detail.STARTING])
            vms.move(session, self.clock, vm_id, Detail.READY, expect=[Detail.RUNNING], **fields)  # type: ignore[arg-type]
        self._account(self.meter.begin, vm_id)

    def _image(self, name: str) -> Image:
        image = self.node.images.get(name)
        if image is None:
            raise image_not_found(name)
        return image

    @staticmethod
    def _resources(vm: Vm) -> Resources:
        return Resources(vcpus=vm.vcpus, mem_mib=vm.mem_mib, disk_mib=vm.disk_mib)

    def start_background(self) -> None:
        self.pool.start()
        self.timers.start()

    def close(self) -> None:
        self.timers.close()
        self.pool.close()
        self._executor.shutdown(wait=True, cancel_futures=False)
        self.node.release()

    # ---- create ---------------------------------------------------------------------------------------------

    def check_image(self, name: str) -> None:
        self._image(name)

    def create(self, user_id: str, new: vms.NewVm) -> Vm:
        """Record a new VM (``queued``) and boot it in the background: a hand-over from the warm pool when
        one fits, else a cold boot. ``new`` must have been through ``vms.validate_new``."""
        started = time.monotonic()
        self.check_image(new.image)
        pooled = (
            None
            if new.snapshot_id is not None
            else self.pool.take(PoolKey(new.image, new.vcpus or 0, new.mem_mib or 0, new.disk_mib or 0))
        )
        try:
            with transaction(self.sessions) as session:
                row = vms.create_vm(session, self.clock, user_id, new, vm_id=pooled, admission=self.admission)
        except BaseException:
            if pooled is not None:
                self.pool.give_back(pooled)
            raise
        self._created[row.id] = started
        self._executor.submit(self._hand_over if pooled else self._boot_new, row.id)
        if row.expires_at is not None:
            self.timers.poke()
        return row

    def _boot_pooled(self, cid: str) -> None:
        key = self.pool.key
        image = self._image(key.image)
        self.node.boot(
            cid, image, Resources(key.vcpus, key.mem_mib, key.disk_mib), hostname_for(cid), fresh=True
        )

    def _hand_over(self, vm_id: str) -> None:
        """The VM's sandbox already runs (booted by the pool under this id): the VM is ready."""
        try:
            with self._vm_lock(vm_id):
                self._move(
                    vm_id, Detail.READY, Detail.QUEUED, container_id=vm_id, create_ms=self._elapsed_ms(vm_id)
                )
        except Exception as exc:
            self._created.pop(vm_id, None)
            log.exception("handing %s over failed", vm_id)
            self._move(vm_id, Detail.FAILED, Detail.QUEUED, reason=_reason(exc))

    def _elapsed_ms(self, vm_id: str) -> int | None:
        started = self._created.pop(vm_id, None)
        return None if started is None else int((time.monotonic() - started) * 1000)

    def _boot_new(self, vm_id: str) -> None:
        try:
            with self._vm_lock(vm_id):
                vm = self._load(vm_id)
                if vm.status_detail == Detail.QUEUED.value:
                    self._boot_cold(vm)
        except Exception as exc:  # the record says why; nothing is left on the host
            self._created.pop(vm_id, None)
            log.exception("creating %s failed", vm_id)
            self._move(
                vm_id, Detail.FAILED, Detail.QUEUED, Detail.CREATING, Detail.STARTING, reason=_reason(exc)
            )

    def _boot_cold(self, vm: Vm) -> None:
        cid = vm.id
        if not self._move(vm.id, Detail.CREATING, Detail.QUEUED, container_id=cid):
            return
        if vm.snapshot_id is not None:
            if self.snapshot_boot is None:
                raise NodeError("this server cannot restore snapshots")
            self.snapshot_boot(vm)
        else:
            self.node.boot(cid, self._image(vm.image), self._resources(vm), hostname_for(vm.id), fresh=True)
        self._come_up(vm.id, created=True, create_ms=self._elapsed_ms(vm.id))

    # ---- start / stop / destroy -----------------------------------------------------------------------------

    def start(self, user_id: str, vm_id: str) -> Vm:
        with self._vm_lock(vm_id):
            vm = self._owned(user_id, vm_id)
            detail = Detail(vm.status_detail)
            if detail in (Detail.RUNNING, Detail.READY):
                raise Conflict("VM is already running", code="vm_already_running")
            if detail is not Detail.STOPPED:
                raise Conflict(
                    f"VM must be stopped before it can be started (it is {detail})", code="vm_not_stopped"
                )
            self._move(vm_id, Detail.STARTING, Detail.STOPPED)
            try:
                image = self._image(vm.image)
                self.node.boot(
                    vm.container_id or vm.id, image, self._resources(vm), hostname_for(vm_id), fresh=False
                )
            except Exception as exc:
                why = _failed("start", vm_id, exc)
                self._move(vm_id, Detail.FAILED, Detail.STARTING, reason=why)
                raise VmFailed(f"VM failed to start: {why}") from None
            self._come_up(vm_id)
            return self._load(vm_id)

    def stop(self, user_id: str, vm_id: str) -> Vm:
        with self._vm_lock(vm_id):
            vm = self._owned(user_id, vm_id)
            detail = Detail(vm.status_detail)
            if detail not in (Detail.RUNNING, Detail.READY):
                raise Conflict(f"VM is not running (it is {detail})", code="vm_not_running")
            self._stop(vm, detail)
            return self._load(vm_id)

    def _stop(self, vm: Vm, detail: Detail) -> None:
        self._move(vm.id, Detail.STOPPING, detail)
        try:
            self.node.stop(vm.container_id or vm.id)
        except Exception as exc:
            why = _failed("stop", vm.id, exc)
            self._move(vm.id, Detail.FAILED, Detail.STOPPING, reason=why)
            raise VmFailed(f"VM failed to stop: {why}") from None
        self._move(vm.id, Detail.STOPPED, Detail.STOPPING)

    def destroy(self, user_id: str, vm_id: str) -> None:
        with self._vm_lock(vm_id):
            vm = self._owned(user_id, vm_id)
            detail = Detail(vm.status_detail)
            if detail is Detail.DESTROYED:
                raise Conflict("VM is already destroyed", code="vm_destroyed")
            if detail not in (Detail.STOPPED, Detail.FAILED, Detail.HIBERNATED):
                raise Conflict("VM must be stopped before it can be destroyed", code="vm_not_stopped")
            self._destroy(vm, detail, "api")

    def _destroy(self, vm: Vm, detail: Detail, reason: str) -> None:
        """Remove a stopped, failed or hibernated VM's sandbox, disk and saved states; ``reason`` (api or
        timeout) is kept on the record."""
        self._move(vm.id, Detail.DESTROYING, detail, destroy_reason=reason)
        try:
            if vm.container_id:
                self.node.destroy(vm.container_id)
                if self.on_destroy is not None:
                    self.on_destroy(vm.container_id, vm.id)
        except Exception as exc:
            why = _failed("destroy", vm.id, exc)
            self._move(vm.id, Detail.FAILED, Detail.DESTROYING, reason=why)
            raise VmFailed(f"VM failed to be destroyed: {why}") from None
        self._move(vm.id, Detail.DESTROYED, Detail.DESTROYING)

    # ---- auto-destroy -----------------------------------------------------------------------------------------

    def reset_timer(self, user_id: str, vm_id: str, timeout: int | None) -> Vm:
        """The auto-destroy timer set to fire ``timeout`` (else the VM's own timeout) seconds from now."""
        with self._vm_lock(vm_id):
            vm = self._owned(user_id, vm_id)
            if Detail(vm.status_detail) in (Detail.DESTROYED, Detail.DESTROYING):
                raise Conflict("VM is already destroyed", code="vm_destroyed")
            seconds = timeout if timeout is not None else vm.timeout
            if seconds is None:
                raise BadRequest(
                    'This VM has no auto-destroy timer: give {"timeout": seconds} to set one',
                    code="vm_has_no_timeout",
                )
            vms.check_timeout(seconds)
            with transaction(self.sessions) as session:
                session.execute(
                    update(Vm)
                    .where(Vm.id == vm_id)
                    .values(
                        timeout=seconds,
                        expires_at=self.clock.now() + timedelta(seconds=seconds),
                        updated_at=self.clock.now(),
                    )
                )
        self.timers.poke()
        return self._load(vm_id)

    def expire_due(self) -> bool:
        """Stop and destroy every VM whose timer has fired. True when one was in the middle of an
        operation (it is tried again shortly)."""
        now = self.clock.now()
        with self.reads() as session:
            due = list(
                session.scalars(
                    select(Vm.id)
                    .where(Vm.expires_at.is_not(None), Vm.expires_at <= now)
                    .order_by(Vm.expires_at)
                )
            )
        retry = False
        for vm_id in due:
            try:
                retry = not self.expire(vm_id) or retry
            except Exception:
                log.exception("auto-destroying %s failed", vm_id)
        return retry

    def expire(self, vm_id: str) -> bool:
        """Stop and destroy the VM if its timer has fired. False when it is in the middle of an operation."""
        with self._vm_lock(vm_id):
            vm = self._load(vm_id)
            if vm.expires_at is None or vm.expires_at > self.clock.now():
                return True
            detail = Detail(vm.status_detail)
            if detail is Detail.DESTROYED:
                self._clear_timer(vm_id)
                return True
            if detail not in _EXPIRES_FROM:
                return False
            log.info("%s: its auto-destroy timer (%s s) fired", vm_id, vm.timeout)
            if detail in (Detail.READY, Detail.RUNNING):
                self._stop(vm, detail)
                detail = Detail.STOPPED
            self._destroy(vm, detail, "timeout")
            return True

    def _clear_timer(self, vm_id: str) -> None:
        with transaction(self.sessions) as session:
            session.execute(update(Vm).where(Vm.id == vm_id).values(expires_at=None))

    def next_deadline(self) -> datetime | None:
        with self.reads() as session:
            return session.scalar(
                select(func.min(Vm.expires_at)).where(Vm.status_detail != Detail.DESTROYED.value)
            )

    def sample_all(self) -> None:
        """The periodic usage sample of every running VM (one busy with an operation is left to it)."""
        for vm_id in self.meter.running():
            lock = self._lock_for(vm_id)
            if not lock.acquire(blocking=False):
                continue
            try:
                self._account(self.meter.sample, vm_id)
            finally:
                lock.release()

    def _owned(self, user_id: str, vm_id: str) -> Vm:
        with self.reads() as session:
            return vms.get_vm(session, user_id, vm_id)

    def running_container(self, user_id: str, vm_id: str, session: Session | None = None) -> str:
        """The container id of the caller's VM, which must be able to run a command now."""
        vm = vms.get_vm(session, user_id, vm_id) if session is not None else self._owned(user_id, vm_id)
        if Detail(vm.status_detail) not in EXECUTABLE or not vm.container_id:
            raise Conflict(f"VM is not running (it is {vm.status_detail})", code="vm_not_running")
        return vm.container_id

    # ---- reconciliation -------------------------------------------------------------------------------------

    def reconcile(self) -> Reconciled:
        """Compare the store with the host: adopt what still runs, fail what was lost, finish interrupted
        stops and destroys, and remove everything on the host no record owns."""
        inv = self.node.inventory()
        adopted = failed = finished = 0
        with self.sessions() as session:
            rows = vms.active_vms(session)
        keep: set[str] = set()
        for vm in rows:
            detail = Detail(vm.status_detail)
            cid = vm.container_id
            running = cid is not None and inv.containers.get(cid) == "running"
            if detail in (Detail.HIBERNATING, Detail.RESUMING, Detail.ROLLING_BACK):
                # a state operation, interrupted: what runs is adopted; a complete hibernation is kept
                if running:
                    adopted += 1
                    keep.add(cid)  # type: ignore[arg-type]
                    self._move(vm.id, Detail.READY, detail)
                    continue
                self._cleanup(cid, keep_disk=True)
                if detail is not Detail.ROLLING_BACK and self.hibernated(cid):
                    self._move(vm.id, Detail.HIBERNATED, detail)
                    finished += 1
                else:
                    self._move(
                        vm.id, Detail.FAILED, detail, reason="the server stopped during a state operation"
                    )
                    failed += 1
                if cid:
                    keep.add(cid)
                continue
            if detail in (Detail.RUNNING, Detail.READY) and running:
                adopted += 1
                keep.add(cid)  # type: ignore[arg-type]
                if detail is Detail.RUNNING:  # killed between running and ready: it runs, so it is ready
                    self._move(vm.id, Detail.READY, Detail.RUNNING)
                continue
            if detail in (Detail.RUNNING, Detail.READY):
                self._cleanup(cid, keep_disk=True)
                self._move(
                    vm.id,
                    Detail.FAILED,
                    detail,
                    reason="the sandbox was no longer running when the server started",
                )
                failed += 1
            elif detail is Detail.STARTING and vm.create_ms is not None:
                # a start of a stopped VM, interrupted: it is stopped again, its disk intact
                self._cleanup(cid, keep_disk=True)
                self._move(vm.id, Detail.STOPPED, detail)
                finished += 1
            elif detail in (Detail.QUEUED, Detail.CREATING, Detail.STARTING):
                # a create, interrupted: nothing of it is worth keeping
                self._cleanup(cid, keep_disk=False)
                self._move(
                    vm.id, Detail.FAILED, detail, reason="the server stopped while the VM was being created"
                )
                failed += 1
            elif detail is Detail.STOPPING:
                self._cleanup(cid, keep_disk=True)
                self._move(vm.id, Detail.STOPPED, detail)
                finished += 1
            elif detail is Detail.DESTROYING:
                if cid:
                    self.node.destroy(cid)
                    if self.on_destroy is not None:
                        self.on_destroy(cid, vm.id)
                self._move(vm.id, Detail.DESTROYED, detail)
                finished += 1
                continue
            else:  # stopped or failed: nothing runs, the disk stays
                self._cleanup(cid, keep_disk=True)
            if cid:
                keep.add(cid)
        orphans = self.node.ids_on_host() - keep
        for cid in orphans:
            try:
                self.node.destroy(cid)
            except Exception:
                log.exception("removing orphan %s failed", cid)
        self.node.disks.clear_stale()
        self.node.reclaim_links(keep)
        return Reconciled(adopted, failed, finished, len(orphans))

    def hibernated(self, cid: str | None) -> bool:
        """Whether the node holds a complete hibernation of sandbox ``cid``."""
        return cid is not None and self.saved.get(hibernate_key(cid)).has_memory

    def _cleanup(self, cid: str | None, *, keep_disk: bool) -> None:
        if not cid:
            return
        if keep_disk:
            self.node.stop(cid)
        else:
            self.node.destroy(cid)


def _reason(exc: BaseException) -> str:
    """What failed, in words for the VM's owner (its ``failure_reason``): no host path, no raw stderr."""
    return failures.describe(exc, safe=(NodeError,))


def _failed(action: str, vm_id: str, exc: BaseException) -> str:
    """The reason for a failed ``action``, and its full detail (stderr, paths, traceback) in the log."""
    why = _reason(exc)
    log.error("%s of %s failed: %s", action, vm_id, why, exc_info=exc)
    return why
