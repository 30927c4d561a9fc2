"""Admission arithmetic, pool sizing and the settings behind them (pure)."""

from __future__ import annotations

import pytest

from corral.config import Settings
from corral.domain.capacity import (
    Amounts,
    NodeCapacity,
    NodeFull,
    Overcommit,
    QuotaExceeded,
    Quotas,
    check_node,
    check_quota,
)
from corral.runtime import cgroups, disk

MIB, GIB = 1 << 20, 1 << 30


def test_quota_names_each_limit_passed_and_what_is_in_use() -> None:
    quotas = Quotas(max_vms=2, max_vcpus=4, max_mem_mib=2048, max_disk_mib=8192)
    check_quota(quotas, Amounts(1, 2, 1024, 4096), Amounts(1, 2, 1024, 4096))  # exactly at every limit
    with pytest.raises(QuotaExceeded) as err:
        check_quota(quotas, Amounts(2, 2, 1024, 4096), Amounts(1, 3, 512, 64))
    assert err.value.status == 409
    assert err.value.code == "quota_exceeded"
    assert "VMs 2 in use + 1 asked > limit 2" in err.value.message
    assert "vCPUs 2 in use + 3 asked > limit 4" in err.value.message
    assert "memory" not in err.value.message
    assert "disk" not in err.value.message


def test_node_admits_up_to_capacity_times_ratio_and_says_what_is_short() -> None:
    cap = NodeCapacity(vcpus=2, mem_mib=1000, disk_mib=4000)
    ratios = Overcommit(vcpus=4.0, mem=1.5, disk=1.0)
    assert cap.admittable(ratios) == Amounts(0, 8, 1500, 4000)
    check_node(cap, ratios, Amounts(5, 7, 1000, 3000), Amounts(1, 1, 500, 1000))
    with pytest.raises(NodeFull) as err:
        check_node(cap, ratios, Amounts(5, 7, 1000, 3000), Amounts(1, 1, 501, 1001))
    assert err.value.status == 503
    assert err.value.code == "node_full"
    assert "memory 1000 MiB in use + 501 MiB asked > limit 1500 MiB" in err.value.message
    assert "disk 3000 MiB in use + 1001 MiB asked > limit 4000 MiB" in err.value.message
    assert "vCPUs" not in err.value.message


def test_pool_sized_from_free_space_and_parent_limit_below_pool_and_host() -> None:
    assert disk.host_reserve_bytes(100 * GIB) == 5 * GIB
    assert disk.host_reserve_bytes(4 * GIB) == GIB  # at least 1 GiB
    assert disk.auto_pool_bytes(70 * GIB, 5 * GIB) == 65 * GIB
    assert disk.auto_pool_bytes(GIB // 2, GIB) == GIB  # never below 1 GiB
    # a fresh pool on a roomy host: below the pool by btrfs's share (10%, at least 256 MiB)
    assert disk.parent_limit_bytes(10 * GIB, 0, 100 * GIB, 5 * GIB) == 9 * GIB
    assert disk.parent_limit_bytes(1280 * MIB, 0, 1536 * MIB, 256 * MIB) == 1024 * MIB
    # a pool bigger than the host can hold (configured, or the host filled up since): the host decides
    assert disk.parent_limit_bytes(256 * GIB, 2 * GIB, 10 * GIB, GIB) == int(11 * GIB * 0.9) // MIB * MIB
    assert disk.parent_limit_bytes(256 * GIB, 0, 0, GIB) == 64 * MIB  # a full host: the floor


def test_host_memory_and_its_reserve() -> None:
    assert cgroups.host_memory_bytes("MemTotal:       24684544 kB\nMemFree: 1 kB\n") == 24684544 * 1024
    assert cgroups.memory_reserve_bytes(24 * GIB) == 24 * GIB // 10
    assert cgroups.memory_reserve_bytes(4 * GIB) == GIB
    with pytest.raises(ValueError, match="MemTotal"):
        cgroups.host_memory_bytes("MemFree: 1 kB\n")


def test_capacity_and_quota_settings() -> None:
    base = {"CORRAL_DATA_DIR": "/tmp/x"}
    s = Settings.from_env(base)
    assert (s.disk_pool_gib, s.node_mem_mib, s.disk_reserve_mib, s.mem_reserve_mib) == (
        None,
        None,
        None,
        None,
    )
    assert (s.overcommit_vcpus, s.overcommit_mem, s.overcommit_disk) == (16.0, 2.0, 4.0)
    assert (s.quota_vms, s.quota_vcpus, s.quota_mem_mib, s.quota_disk_mib) == (20, 32, 65536, 262144)
    assert s.operator_emails == ()
    s = Settings.from_env(
        {
            **base,
            "CORRAL_DISK_POOL_GIB": "8",
            "CORRAL_DISK_RESERVE_MIB": "0",
            "CORRAL_NODE_MEM_MIB": "512",
            "CORRAL_OVERCOMMIT_MEM": "1.5",
            "CORRAL_QUOTA_VMS": "3",
            "CORRAL_OPERATOR_EMAILS": "Ops@Example.com, b@example.com",
        }
    )
    assert (s.disk_pool_gib, s.disk_reserve_mib, s.node_mem_mib, s.overcommit_mem) == (8, 0, 512, 1.5)
    assert s.quota_vms == 3
    assert s.operator_emails == ("ops@example.com", "b@example.com")
    for name, bad in (
        ("CORRAL_OVERCOMMIT_DISK", "0"),
        ("CORRAL_OVERCOMMIT_VCPUS", "x"),
        ("CORRAL_QUOTA_VMS", "0"),
    ):
        with pytest.raises(SystemExit, match=name):
            Settings.from_env({**base, name: bad})
