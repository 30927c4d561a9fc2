"""Reading a sandbox's CPU and memory use from its cgroup, on a v1 hybrid host or a pure v2 one.

v1: ``cpuacct.usage`` (ns), ``memory.usage_in_bytes``, ``memory.max_usage_in_bytes``.
v2: ``cpu.stat`` ``usage_usec``, ``memory.current``, ``memory.peak`` (kernels before 5.19 have no peak:
the current use stands in for it)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from corral.domain.usage import Reading
from corral.runtime import cgroups
from corral.runtime.cgroups import CGROUP_ROOT


class UsageReader(Protocol):
    def read(self, cid: str) -> Reading | None:
        """The sandbox's counters now; None when it has no cgroup (not running)."""
        ...


def cpu_stat_usage_ns(text: str) -> int | None:
    """``usage_usec`` of a v2 ``cpu.stat``, in ns."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec" and value.strip().isdigit():
            return int(value) * 1000
    return None


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


class CgroupUsage:
    """The real reader: the sandboxes of one node parent (``corral-<node id>``)."""

    def __init__(self, parent: str, root: Path = CGROUP_ROOT) -> None:
        self.parent = parent
        self.root = root
        self.v2 = cgroups.is_pure_v2(root)

    def _stat(self, cid: str, controller: str, key: str) -> str | None:
        return cgroups.read_stat(self.parent, cid, controller, key, self.root)

    def read(self, cid: str) -> Reading | None:
        if self.v2:
            stat = self._stat(cid, "cpu", "cpu.stat")
            cpu = None if stat is None else cpu_stat_usage_ns(stat)
            mem = _int(self._stat(cid, "memory", "memory.current"))
            peak = _int(self._stat(cid, "memory", "memory.peak"))
        else:
            cpu = _int(self._stat(cid, "cpuacct", "cpuacct.usage"))
            mem = _int(self._stat(cid, "memory", "memory.usage_in_bytes"))
            peak = _int(self._stat(cid, "memory", "memory.max_usage_in_bytes"))
        if cpu is None or mem is None:
            return None
        return Reading(cpu_ns=cpu, mem_bytes=mem, mem_peak_bytes=max(mem, peak or 0))
