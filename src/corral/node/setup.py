"""Building this host's node from the settings, and the default image it needs."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from corral.config import Settings
from corral.domain.capacity import NodeCapacity, Overcommit, Quotas
from corral.egress.ca import ensure_ca
from corral.net.plan import NetPlan, upstream_dns_from
from corral.node.local import GIB, LocalNode, NodeConfig
from corral.runtime.disk import MIB
from corral.runtime.images import (
    DEFAULT_IMAGE,
    DEFAULT_PACKAGES,
    DEFAULT_SUITE,
    Image,
    Progress,
    build_source,
)
from corral.runtime.spec import Runtime
from corral.services import vms
from corral.services.lifecycle import Lifecycle
from corral.services.vms import Admission

RESOLV_CONFS = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf"))


def net_plan(settings: Settings) -> NetPlan | None:
    """The sandbox network of this host, or None when it is turned off."""
    if not settings.network:
        return None
    return NetPlan(
        gateway_ns=settings.gateway_netns,
        sandbox_subnet=settings.sandbox_subnet,
        uplink=settings.uplink,
        uplink_subnet=settings.uplink_subnet,
        upstream_dns=settings.upstream_dns or host_name_servers(),
        proxy_port=settings.egress_proxy_port,
        dns_port=settings.egress_dns_port,
    )


def host_name_servers() -> tuple[str, ...]:
    """The host's name servers the gateway can reach (a loopback stub such as systemd-resolved's is not:
    its upstream servers are used instead)."""
    for path in RESOLV_CONFS:
        try:
            found = upstream_dns_from(path.read_text())
        except OSError:
            continue
        if found:
            return found
    return ()


def use_tools(prefix: Path) -> str | None:
    """Put Corral's own CRIU (built by scripts/build-state-tools) first on PATH, where the runtimes look for
    it; the crun built with it, if there is one."""
    sbin = prefix / "sbin"
    if (sbin / "criu").exists():
        path = os.environ.get("PATH", "")
        if str(sbin) not in path.split(":"):
            os.environ["PATH"] = f"{sbin}:{path}" if path else str(sbin)
    crun = prefix / "bin" / "crun"
    return str(crun) if crun.exists() else None


def make_node(settings: Settings) -> LocalNode:
    plan = net_plan(settings)
    crun = use_tools(settings.tools_prefix)
    return LocalNode(
        NodeConfig(
            root=settings.data_dir / "node",
            images_dir=settings.images_path,
            runtime=Runtime(settings.runtime),
            runtime_binary=crun if settings.runtime == "crun" else None,
            id_base=settings.sandbox_id_base,
            disk_pool_bytes=None if settings.disk_pool_gib is None else settings.disk_pool_gib * GIB,
            disk_reserve_bytes=None if settings.disk_reserve_mib is None else settings.disk_reserve_mib * MIB,
            mem_limit_bytes=None if settings.node_mem_mib is None else settings.node_mem_mib * MIB,
            mem_reserve_bytes=None if settings.mem_reserve_mib is None else settings.mem_reserve_mib * MIB,
            disk_watch_s=settings.disk_watch_s,
            init_binary=settings.sandbox_init,
            network=plan,
            trust_pem=ensure_ca(settings.egress_dir) if plan is not None else None,
        )
    )


def ensure_default_image(node: LocalNode, progress: Progress | None = None) -> Image:
    """The default image, built from Debian packages the first time it is needed (about 20 s), and again when
    it was built from another package list (an older Corral)."""
    image = node.images.get(DEFAULT_IMAGE)
    if image is not None and image.source == build_source(DEFAULT_SUITE, DEFAULT_PACKAGES):
        return image
    return node.images.build(DEFAULT_IMAGE, progress=progress)


def admission(settings: Settings, capacity: NodeCapacity | None = None) -> Admission:
    """Quotas and overcommit ratios from the settings, with the node's capacity once it is prepared."""
    return Admission(
        quotas=Quotas(
            settings.quota_vms, settings.quota_vcpus, settings.quota_mem_mib, settings.quota_disk_mib
        ),
        capacity=capacity,
        ratios=Overcommit(settings.overcommit_vcpus, settings.overcommit_mem, settings.overcommit_disk),
    )


def admit_creates(life: Lifecycle, settings: Settings) -> None:
    """Every create admitted against the account's quotas and the node's capacity (the warm pool's waiting
    sandboxes count as committed), and the warm pool refilled only while the node has room."""
    pool = life.pool
    life.admission = dataclasses.replace(admission(settings, life.node.capacity), reserved=pool.reserved)

    def room() -> bool:
        assert life.admission is not None
        with life.reads() as session:
            return vms.node_has_room(session, life.admission, pool.reserved(1))

    pool.room = room
