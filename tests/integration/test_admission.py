"""Admission against the store (SQLite, or PostgreSQL when CORRAL_TEST_DATABASE_URL is set): quotas count an
account's VMs that are not destroyed, the node's check every account's plus the warm pool's."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy.orm import Session, sessionmaker

from corral.domain.capacity import Amounts, NodeCapacity, NodeFull, Overcommit, QuotaExceeded, Quotas
from corral.domain.ids import Prefix, new_id
from corral.services import vms
from corral.store.db import transaction
from corral.store.tables import User, Vm

NOW = datetime(2026, 12, 8, tzinfo=UTC)


def _user(sessions: sessionmaker[Session]) -> str:
    uid = new_id(Prefix.USER)
    with transaction(sessions) as s:
        s.add(
            User(
                id=uid,
                first_name="A",
                last_name="B",
                email=f"{uid}@example.com",
                password_hash="x",
                created_at=NOW,
            )
        )
    return uid


def _vm(sessions: sessionmaker[Session], uid: str, detail: str, vcpus: int, mem: int, disk: int) -> None:
    vm_id = new_id(Prefix.VM)
    with transaction(sessions) as s:
        s.add(
            Vm(
                id=vm_id,
                user_id=uid,
                name=vm_id,
                public_key="k",
                status_detail=detail,
                image="debian:bookworm",
                vcpus=vcpus,
                mem_mib=mem,
                disk_mib=disk,
                created_at=NOW,
                updated_at=NOW,
            )
        )


def _new(vcpus: int, mem: int, disk: int) -> vms.NewVm:
    return vms.NewVm(name="n", public_key="k", image="i", vcpus=vcpus, mem_mib=mem, disk_mib=disk)


def test_quota_counts_the_accounts_vms_that_are_not_destroyed(sessions: sessionmaker[Session]) -> None:
    alice, bob = _user(sessions), _user(sessions)
    _vm(sessions, alice, "ready", 2, 1024, 4096)
    _vm(sessions, alice, "stopped", 1, 512, 1024)  # a stopped VM holds its share
    _vm(sessions, alice, "destroyed", 4, 8192, 65536)  # a destroyed one does not
    _vm(sessions, bob, "ready", 4, 8192, 65536)  # nor another account's
    with transaction(sessions) as s:
        assert vms.held(s, alice) == Amounts(2, 3, 1536, 5120)
    admission = vms.Admission(quotas=Quotas(max_vms=3, max_vcpus=4, max_mem_mib=2048, max_disk_mib=8192))
    with transaction(sessions) as s:
        vms.admit(s, admission, alice, _new(1, 512, 3072))  # exactly at the limits
    over = r"memory 1536 MiB in use \+ 513 MiB asked > limit 2048 MiB"
    with pytest.raises(QuotaExceeded, match=over), transaction(sessions) as s:
        vms.admit(s, admission, alice, _new(1, 513, 64))


def test_node_counts_every_account_and_the_warm_pool(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        base = vms.held(s)
    cap = NodeCapacity(vcpus=base.vcpus + 8, mem_mib=base.mem_mib + 4096, disk_mib=base.disk_mib + 10000)
    admission = vms.Admission(
        quotas=Quotas(max_vms=100, max_vcpus=100, max_mem_mib=10**6, max_disk_mib=10**7),
        capacity=cap,
        ratios=Overcommit(vcpus=1.0, mem=1.0, disk=1.0),
        reserved=lambda: Amounts(0, 1, 1024, 4096),
    )
    carol, dave = _user(sessions), _user(sessions)
    _vm(sessions, carol, "ready", 2, 1024, 2000)
    with transaction(sessions) as s:
        vms.admit(s, admission, dave, _new(1, 2048, 3904))  # 1024 + 1024 (pool) + 2048 = 4096
        assert vms.node_has_room(s, admission, Amounts(0, 1, 2048, 3904))
        assert not vms.node_has_room(s, admission, Amounts(0, 1, 2049, 64))
    with pytest.raises(NodeFull, match="memory") as err, transaction(sessions) as s:
        vms.admit(s, admission, dave, _new(1, 2049, 64))
    assert "disk" not in err.value.message
