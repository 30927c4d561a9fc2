"""Sandbox state through the API: snapshots (iron.sh), hibernate / resume and fork (isorun), checkpoints and
rollback (the instances platform). The VM's lock is held across each host operation, as for start and stop;
database transactions stay short."""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.domain.errors import Conflict, CorralError, NotFound, ValidationFailed, not_found
from corral.domain.ids import Prefix, has_prefix, new_id
from corral.domain.pagination import ListSpec, Page, PageRequest
from corral.domain.vm_states import EXECUTABLE, Detail
from corral.node.local import NodeError
from corral.node.snapstore import SnapshotDamaged, SnapshotStore
from corral.node.state import Capture, StateError, hibernate_key
from corral.runtime import rootfs
from corral.services import vms
from corral.services.lifecycle import Lifecycle, hostname_for
from corral.store.db import transaction
from corral.store.paging import SortColumns, paginate
from corral.store.tables import Checkpoint, Snapshot, Vm

log = logging.getLogger("corral.state")

SNAPSHOT_LIST = ListSpec(default_limit=20, max_limit=100, sorts=("created_at",))
_SNAPSHOT_SORTS: SortColumns = {"created_at": (Snapshot.created_at, datetime)}
_CHECKPOINT_SORTS: SortColumns = {"created_at": (Checkpoint.created_at, datetime)}
CHECKPOINT_LIST = ListSpec(default_limit=20, max_limit=100, sorts=("created_at",))
_CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_FORK = 16


class StateFailed(CorralError):
    status = 500
    code = "state_failed"


def snapshot_not_found(ident: str) -> NotFound:
    return not_found("snapshot", ident)


def checkpoint_not_found(ident: str) -> NotFound:
    return not_found("checkpoint", ident)


def _vm_not_running(vm: Vm) -> Conflict:
    return Conflict(
        f"VM must be in running or ready status (it is {vm.status_detail})", code="vm_not_running"
    )


class StateService:
    def __init__(self, life: Lifecycle, store: SnapshotStore, *, workers: int = 4) -> None:
        self.life = life
        self.store = store
        self.node = life.saved
        self._background = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="corral-state")
        life.snapshot_boot = self._boot_from_snapshot

    def close(self) -> None:
        self._background.shutdown(wait=True, cancel_futures=False)

    # ---- helpers --------------------------------------------------------------------------------------------

    def _running(self, vm: Vm) -> str:
        if Detail(vm.status_detail) not in EXECUTABLE or not vm.container_id:
            raise _vm_not_running(vm)
        return vm.container_id

    def _set_snapshot(self, snap_id: str, **fields: object) -> None:
        with transaction(self.life.sessions) as session:
            session.execute(
                update(Snapshot)
                .where(Snapshot.id == snap_id)
                .values(updated_at=self.life.clock.now(), **fields)
                .execution_options(synchronize_session=False)
            )

    # ---- snapshots ------------------------------------------------------------------------------------------

    def create_snapshot(self, user_id: str, vm_id: str, label: str | None, *, memory: bool) -> Snapshot:
        with self.life._vm_lock(vm_id):
            vm = self.life._owned(user_id, vm_id)
            self._running(vm)
            now = self.life.clock.now()
            row = Snapshot(
                id=new_id(Prefix.SNAPSHOT),
                user_id=user_id,
                source_vm_id=vm.id,
                source_base_image=None if vm.snapshot_id else vm.image,
                source_snapshot_id=vm.snapshot_id,
                label=label,
                status="pending",
                memory=memory,
                image=vm.image,
                vcpus=vm.vcpus,
                mem_mib=vm.mem_mib,
                disk_mib=vm.disk_mib,
                created_at=now,
                updated_at=now,
            )
            with transaction(self.life.sessions) as session:
                session.add(row)
        self._background.submit(self._take_snapshot, row.id, vm.id, memory)
        return row

    def _take_snapshot(self, snap_id: str, vm_id: str, memory: bool) -> None:
        """pending: capture the VM (it pauses a moment); uploading: write it to the store; ready."""
        key = snap_id
        try:
            with self.life._vm_lock(vm_id):
                vm = self.life._load(vm_id)
                cid = self._running(vm)
                cap = self.node.capture(cid, key, memory=memory, disk=True, leave_running=True)
            self._set_snapshot(snap_id, status="uploading")
            size = self.store.put(snap_id, cap.disk, cap.memory if cap.has_memory else None)
            self._set_snapshot(
                snap_id, status="ready", size_bytes=size, storage_key=self.store.storage_key(snap_id)
            )
            with self.life.reads() as session:
                deleted = session.scalar(select(Snapshot.deleted_at).where(Snapshot.id == snap_id))
            if deleted is not None:  # deleted while it was being taken: its data goes now
                self.store.delete(snap_id)
        except Exception as exc:
            log.exception("snapshot %s failed", snap_id)
            self.store.delete(snap_id)
            self._set_snapshot(snap_id, status="failed", failure_reason=_reason(exc))
        finally:
            self.node.drop(key)

    def get_snapshot(self, session: Session, user_id: str, snap_id: str) -> Snapshot:
        row = session.get(Snapshot, snap_id) if has_prefix(snap_id, Prefix.SNAPSHOT) else None
        if row is None or row.user_id != user_id or row.deleted_at is not None:
            raise snapshot_not_found(snap_id)
        return row

    def list_snapshots(
        self, session: Session, user_id: str, request: PageRequest, vm_id: str | None = None
    ) -> Page[Snapshot]:
        stmt = select(Snapshot).where(Snapshot.user_id == user_id, Snapshot.deleted_at.is_(None))
        if vm_id is not None:
            vms.get_vm(session, user_id, vm_id)
            stmt = stmt.where(Snapshot.source_vm_id == vm_id)
        return paginate(
            session,
            stmt,
            request=request,
            sort_columns=_SNAPSHOT_SORTS,
            id_column=Snapshot.id,
            render=lambda r: r,
        )

    def delete_snapshot(self, user_id: str, snap_id: str) -> None:
        """Soft delete: the record stays (lineage), the stored data goes. VMs booted from it keep running:
        their disk was unpacked into their own volume."""
        with transaction(self.life.sessions) as session:
            row = self.get_snapshot(session, user_id, snap_id)
            row.deleted_at = self.life.clock.now()
            pending = row.status in ("pending", "uploading")
        if not pending:
            self.store.delete(snap_id)

    def check_restorable(self, session: Session, user_id: str, snap_id: str) -> Snapshot:
        """The snapshot a new VM is to boot from: the caller's, ready, and intact (checksums)."""
        snap = self.get_snapshot(session, user_id, snap_id)
        if snap.status != "ready":
            raise Conflict(f"Snapshot {snap_id} is {snap.status}, not ready", code="snapshot_not_ready")
        try:
            self.store.verify(snap_id)
        except SnapshotDamaged as exc:
            self._set_snapshot(snap_id, status="failed", failure_reason=str(exc))
            raise Conflict(f"Snapshot {snap_id} is damaged: {exc}", code="snapshot_damaged") from None
        return snap

    def _boot_from_snapshot(self, vm: Vm) -> None:
        """A new VM's sandbox from a snapshot: its disk unpacked into a new volume, its processes restored
        (or, for a disk-only snapshot, booted). Called by the lifecycle with the VM creating; raises on
        failure with nothing left on the host."""
        assert vm.snapshot_id is not None
        snap_id, cid = vm.snapshot_id, vm.id
        node = self.life.node
        image = self.life._image(vm.image)
        res = self.life._resources(vm)
        volume = node.disks.create(cid, res.disk_mib)
        try:
            self.store.verify(snap_id)
            self.store.restore_disk(snap_id, volume)
            memory = self.store.memory_dir(snap_id)
        except BaseException:
            node.disks.delete(cid)
            raise
        if memory is None:
            rootfs.seed_identity(volume, hostname_for(cid), node.root_uid())
            node.boot(cid, image, res, hostname_for(cid), fresh=False)
            return
        try:
            pid = self.node.restore(cid, memory, image, res, hostname_for(cid))
            self.node.rename(cid, pid, hostname_for(cid))
        except BaseException:
            node.stop(cid)
            node.disks.delete(cid)
            raise

    # ---- hibernate / resume ---------------------------------------------------------------------------------

    def hibernate(self, user_id: str, vm_id: str) -> Vm:
        with self.life._vm_lock(vm_id):
            vm = self.life._owned(user_id, vm_id)
            cid = self._running(vm)
            detail = Detail(vm.status_detail)
            self.life._move(vm_id, Detail.HIBERNATING, detail)
            try:
                self.node.capture(cid, hibernate_key(cid), memory=True, disk=False, leave_running=False)
            except Exception as exc:
                back = Detail.READY if self.life.node.pid(cid) is not None else Detail.FAILED
                self.life._move(vm_id, back, Detail.HIBERNATING, reason=_reason(exc))
                raise StateFailed(f"VM could not be hibernated: {_reason(exc)}") from None
            self.life._move(vm_id, Detail.HIBERNATED, Detail.HIBERNATING)
            return self.life._load(vm_id)

    def resume(self, user_id: str, vm_id: str) -> Vm:
        with self.life._vm_lock(vm_id):
            vm = self.life._owned(user_id, vm_id)
            if Detail(vm.status_detail) is not Detail.HIBERNATED or not vm.container_id:
                raise Conflict(f"VM is not hibernated (it is {vm.status_detail})", code="vm_not_hibernated")
            cid = vm.container_id
            self.life._move(vm_id, Detail.RESUMING, Detail.HIBERNATED)
            cap = self.node.get(hibernate_key(cid))
            try:
                self.node.restore(
                    cid, cap.memory, self.life._image(vm.image), self.life._resources(vm), hostname_for(vm_id)
                )
            except Exception as exc:
                self.life._move(vm_id, Detail.HIBERNATED, Detail.RESUMING)
                raise StateFailed(f"VM could not be resumed: {_reason(exc)}") from None
            self.life._move(vm_id, Detail.READY, Detail.RESUMING)
            self.node.drop(cap.key)
            return self.life._load(vm_id)

    # ---- fork -----------------------------------------------------------------------------------------------

    def fork(self, user_id: str, vm_id: str, count: int) -> list[Vm]:
        """``count`` new running VMs with the source's disk and memory at one instant; the source runs on."""
        if not 1 <= count <= MAX_FORK:
            raise ValidationFailed(f"count must be between 1 and {MAX_FORK}")
        # the source's lock is held until its children run: its network and command server come back while
        # they are restored
        with self.life._vm_lock(vm_id):
            src = self.life._owned(user_id, vm_id)
            cid = self._running(src)
            key = f"fork-{new_id(Prefix.VM)}"
            try:
                cap = self.node.capture(cid, key, memory=True, disk=True, leave_running=True, revive=False)
            except Exception as exc:
                raise StateFailed(f"VM could not be forked: {_reason(exc)}") from None
            try:
                reviving = self.life.node.helpers.submit(self.node.revive, cap)
                try:
                    children = self._child_records(src, count)
                    self._restore_children(src, cap, children)
                finally:
                    reviving.result()
            finally:
                self.node.drop(key)
        with self.life.reads() as session:
            return [row for c in children if (row := session.get(Vm, c.id)) is not None]

    def _restore_children(self, src: Vm, cap: Capture, children: list[Vm]) -> None:
        image = self.life._image(src.image)
        res = self.life._resources(src)

        def one(child: Vm) -> None:
            try:
                pid = self.node.restore(
                    child.id, cap.memory, image, res, hostname_for(child.id), disk_from=cap.disk
                )
                self.node.rename(child.id, pid, hostname_for(child.id))
                self.life._come_up(child.id, created=True)
            except Exception as exc:
                log.exception("fork child %s failed", child.id)
                self.life._move(
                    child.id, Detail.FAILED, Detail.CREATING, Detail.STARTING, reason=_reason(exc)
                )

        if len(children) == 1:
            one(children[0])
            return
        with ThreadPoolExecutor(max_workers=min(len(children), 4), thread_name_prefix="corral-fork") as pool:
            list(pool.map(one, children))

    def _child_records(self, src: Vm, count: int) -> list[Vm]:
        now = self.life.clock.now()
        rows: list[Vm] = []
        with transaction(self.life.sessions) as session:
            if self.life.admission is not None:  # the children count against quotas and the node like creates
                like = vms.NewVm("", "", src.image, src.vcpus, src.mem_mib, src.disk_mib)
                vms.admit(session, self.life.admission, src.user_id, like, count=count)
            for _ in range(count):
                child_id = new_id(Prefix.VM)
                row = Vm(
                    id=child_id,
                    user_id=src.user_id,
                    name=f"{src.name[:40]}-fork-{child_id.removeprefix('vm_')}",
                    public_key=src.public_key,
                    status_detail=Detail.CREATING.value,
                    image=src.image,
                    snapshot_id=src.snapshot_id,
                    vcpus=src.vcpus,
                    mem_mib=src.mem_mib,
                    disk_mib=src.disk_mib,
                    egress_mode=src.egress_mode,
                    egress_rules=src.egress_rules,
                    container_id=child_id,
                    created_at=now,
                    updated_at=now,
                )
                try:
                    with session.begin_nested():
                        session.add(row)
                except IntegrityError:
                    raise Conflict("a fork child's name is taken", code="vm_name_taken") from None
                rows.append(row)
        return rows

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def create_checkpoint(self, user_id: str, vm_id: str, name: str, *, memory: bool) -> Checkpoint:
        if not _CHECKPOINT_NAME.fullmatch(name):
            raise ValidationFailed(
                "name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        with self.life._vm_lock(vm_id):
            vm = self.life._owned(user_id, vm_id)
            cid = self._running(vm)
            with self.life.reads() as session:
                taken = session.scalar(
                    select(Checkpoint.id).where(Checkpoint.vm_id == vm_id, Checkpoint.name == name)
                )
            if taken:
                raise Conflict(f"VM {vm_id} has a checkpoint named {name}", code="checkpoint_name_taken")
            ckpt_id = new_id(Prefix.CHECKPOINT)
            try:
                self.node.capture(cid, ckpt_id, memory=memory, disk=True, leave_running=True)
            except Exception as exc:
                raise StateFailed(f"the checkpoint could not be taken: {_reason(exc)}") from None
            row = Checkpoint(
                id=ckpt_id,
                user_id=user_id,
                vm_id=vm_id,
                name=name,
                memory=memory,
                size_bytes=self.node.size_bytes(ckpt_id),
                created_at=self.life.clock.now(),
            )
            try:
                with transaction(self.life.sessions) as session:
                    session.add(row)
            except IntegrityError:
                self.node.drop(ckpt_id)
                raise Conflict(
                    f"VM {vm_id} has a checkpoint named {name}", code="checkpoint_name_taken"
                ) from None
            return row

    def get_checkpoint(self, session: Session, user_id: str, vm_id: str, ckpt_id: str) -> Checkpoint:
        vms.get_vm(session, user_id, vm_id)
        row = session.get(Checkpoint, ckpt_id) if has_prefix(ckpt_id, Prefix.CHECKPOINT) else None
        if row is None or row.vm_id != vm_id:
            raise checkpoint_not_found(ckpt_id)
        return row

    def list_checkpoints(
        self, session: Session, user_id: str, vm_id: str, request: PageRequest
    ) -> Page[Checkpoint]:
        vms.get_vm(session, user_id, vm_id)
        stmt = select(Checkpoint).where(Checkpoint.vm_id == vm_id)
        return paginate(
            session,
            stmt,
            request=request,
            sort_columns=_CHECKPOINT_SORTS,
            id_column=Checkpoint.id,
            render=lambda r: r,
        )

    def delete_checkpoint(self, user_id: str, vm_id: str, ckpt_id: str) -> None:
        with self.life._vm_lock(vm_id):
            with transaction(self.life.sessions) as session:
                row = self.get_checkpoint(session, user_id, vm_id, ckpt_id)
                session.delete(row)
            self.node.drop(ckpt_id)

    def rollback(self, user_id: str, vm_id: str, ckpt_id: str) -> Vm:
        """The VM back to the checkpoint: its disk (a clone of the checkpoint's) and, when the checkpoint has
        them, its processes. The checkpoint stays (roll back to it again)."""
        with self.life._vm_lock(vm_id):
            with self.life.reads() as session:
                ckpt = self.get_checkpoint(session, user_id, vm_id, ckpt_id)
                vm = vms.get_vm(session, user_id, vm_id)
            cid = self._running(vm)
            cap = self.node.get(ckpt.id)
            if not cap.has_disk:
                raise StateFailed(f"checkpoint {ckpt_id} has no saved disk on this node")
            self.life._move(vm_id, Detail.ROLLING_BACK, Detail(vm.status_detail))
            node = self.life.node
            image = self.life._image(vm.image)
            res = self.life._resources(vm)
            aside = f"{cid}.old"
            node.stop(cid)
            node.disks.delete(aside)
            node.disks.path(cid).rename(node.disks.path(aside))
            try:
                if cap.has_memory:
                    self.node.restore(cid, cap.memory, image, res, hostname_for(vm_id), disk_from=cap.disk)
                else:
                    node.disks.clone(cap.disk, cid, res.disk_mib)
                    node.boot(cid, image, res, hostname_for(vm_id), fresh=False)
            except Exception as exc:
                # the checkpoint did not come back: the VM boots again from the disk it had
                node.stop(cid)
                node.disks.delete(cid)
                node.disks.path(aside).rename(node.disks.path(cid))
                try:
                    node.boot(cid, image, res, hostname_for(vm_id), fresh=False)
                except NodeError as again:
                    self.life._move(vm_id, Detail.FAILED, Detail.ROLLING_BACK, reason=_reason(again))
                    raise StateFailed(
                        f"rollback failed and the VM could not be restarted: {_reason(again)}"
                    ) from None
                self.life._move(vm_id, Detail.READY, Detail.ROLLING_BACK)
                raise StateFailed(
                    f"rollback failed ({_reason(exc)}); the VM was restarted from its disk as it was"
                ) from None
            node.disks.delete(aside)
            self.life._move(vm_id, Detail.READY, Detail.ROLLING_BACK)
            return self.life._load(vm_id)

    # ---- what a VM leaves behind ----------------------------------------------------------------------------

    def forget_vm(self, cid: str, vm_id: str) -> None:
        """A destroyed VM's saved states on the node: its hibernation and its checkpoints."""
        self.node.drop(hibernate_key(cid))
        with self.life.reads() as session:
            ids = list(session.scalars(select(Checkpoint.id).where(Checkpoint.vm_id == vm_id)))
        for ckpt_id in ids:
            self.node.drop(ckpt_id)

    def reconcile(self) -> None:
        """At start: snapshots that were being taken failed; captures nothing refers to are removed."""
        with transaction(self.life.sessions) as session:
            stale = list(
                session.scalars(select(Snapshot).where(Snapshot.status.in_(["pending", "uploading"])))
            )
            for snap in stale:
                snap.status = "failed"
                snap.failure_reason = "the server stopped while the snapshot was being taken"
                snap.updated_at = self.life.clock.now()
            keep = set(session.scalars(select(Checkpoint.id)))
            for vm in session.scalars(
                select(Vm).where(
                    Vm.status_detail.in_(
                        [Detail.HIBERNATED.value, Detail.HIBERNATING.value, Detail.RESUMING.value]
                    )
                )
            ):
                if vm.container_id:
                    keep.add(hibernate_key(vm.container_id))
        for snap in stale:
            self.store.delete(snap.id)
        for key in self.node.keys() - keep:
            self.node.drop(key)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CorralError):
        return exc.message
    if isinstance(exc, StateError | NodeError | SnapshotDamaged):
        return str(exc)
    return f"internal error: {type(exc).__name__}"
