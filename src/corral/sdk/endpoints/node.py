"""``GET /v1/node``: the node's capacity, what is committed and what is used (operators only)."""

from __future__ import annotations

from corral.sdk.call import Call, Route, model
from corral.sdk.models import Model

GET_NODE = Route("GET", "/v1/node")


class NodeAmounts(Model):
    vcpus: int
    mem_mib: int
    disk_mib: int


class NodeCommitted(NodeAmounts):
    vms: int
    warm_pool: int


class NodeRatios(Model):
    vcpus: float
    mem: float
    disk: float


class NodeUsed(Model):
    mem_bytes: int | None
    mem_limit_bytes: int | None
    disk_bytes: int | None
    disk_limit_bytes: int | None
    pool_size_bytes: int | None
    pool_allocated_bytes: int | None
    host_free_bytes: int | None


class NodeInfo(Model):
    id: str
    capacity: NodeAmounts
    overcommit: NodeRatios
    admittable: NodeAmounts
    committed: NodeCommitted
    used: NodeUsed


def get_node() -> Call[NodeInfo]:
    """The node's capacity, committed and used figures (403 ``forbidden`` unless the caller is an operator)."""
    return Call(GET_NODE, model(NodeInfo))
