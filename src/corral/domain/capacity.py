"""Admission arithmetic (pure): per-account quotas and the node's capacity with its overcommit ratios.

A VM holds its ``vcpus``, ``mem_mib`` and ``disk_mib`` from create until it is destroyed (a stopped VM keeps
its disk and may be started again), so both checks count every VM that is not destroyed."""

from __future__ import annotations

from dataclasses import dataclass

from corral.domain.errors import Conflict, CorralError


@dataclass(frozen=True)
class Amounts:
    """What a set of VMs holds."""

    vms: int = 0
    vcpus: int = 0
    mem_mib: int = 0
    disk_mib: int = 0

    def __add__(self, other: Amounts) -> Amounts:
        return Amounts(
            self.vms + other.vms,
            self.vcpus + other.vcpus,
            self.mem_mib + other.mem_mib,
            self.disk_mib + other.disk_mib,
        )

    def times(self, count: int) -> Amounts:
        return Amounts(self.vms * count, self.vcpus * count, self.mem_mib * count, self.disk_mib * count)


@dataclass(frozen=True)
class Quotas:
    """Per-account limits over the account's VMs that are not destroyed."""

    max_vms: int = 20
    max_vcpus: int = 32
    max_mem_mib: int = 65536
    max_disk_mib: int = 262144


@dataclass(frozen=True)
class Overcommit:
    """How far the sum of what VMs were promised may exceed the node's capacity."""

    vcpus: float = 4.0
    mem: float = 1.0
    disk: float = 1.0


@dataclass(frozen=True)
class NodeCapacity:
    """What all sandboxes of the node share: the host's CPUs, the parent memory cgroup's limit and the
    parent btrfs qgroup's limit."""

    vcpus: int
    mem_mib: int
    disk_mib: int

    def admittable(self, ratios: Overcommit) -> Amounts:
        """The most that may be committed: capacity times the overcommit ratio (``vms`` unused)."""
        return Amounts(
            0,
            int(self.vcpus * ratios.vcpus),
            int(self.mem_mib * ratios.mem),
            int(self.disk_mib * ratios.disk),
        )


class QuotaExceeded(Conflict):
    code = "quota_exceeded"


class NodeFull(CorralError):
    status = 503
    code = "node_full"


_UNITS = {"vms": "", "vcpus": "", "mem_mib": " MiB", "disk_mib": " MiB"}
_LABELS = {"vms": "VMs", "vcpus": "vCPUs", "mem_mib": "memory", "disk_mib": "disk"}


def check_quota(quotas: Quotas, in_use: Amounts, new: Amounts) -> None:
    """Raise QuotaExceeded (409) naming each limit the new VM would pass and what is in use."""
    limits = Amounts(quotas.max_vms, quotas.max_vcpus, quotas.max_mem_mib, quotas.max_disk_mib)
    over = _over(limits, in_use, new, ("vms", "vcpus", "mem_mib", "disk_mib"))
    if over:
        raise QuotaExceeded(
            "Account quota exceeded: "
            + "; ".join(over)
            + ". Destroy VMs you no longer need (stopped and failed VMs hold their resources too)"
        )


def check_node(capacity: NodeCapacity, ratios: Overcommit, committed: Amounts, new: Amounts) -> None:
    """Raise NodeFull (503) naming what is short on the node."""
    over = _over(capacity.admittable(ratios), committed, new, ("vcpus", "mem_mib", "disk_mib"))
    if over:
        raise NodeFull("This node has no room for the VM: " + "; ".join(over) + ". Try a smaller VM or later")


def _over(limits: Amounts, in_use: Amounts, new: Amounts, fields: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for name in fields:
        limit, used, asked = getattr(limits, name), getattr(in_use, name), getattr(new, name)
        if used + asked > limit:
            unit = _UNITS[name]
            out.append(f"{_LABELS[name]} {used}{unit} in use + {asked}{unit} asked > limit {limit}{unit}")
    return out
