"""Real sandboxes on this host: one node server for the session (warm pool of 2), accounts on it. Its
gateway's uplink is a fake internet made for the session (tests/fakenet.py): its DNS is the upstream
resolver, its CA the one the proxy trusts upstream; no packet goes anywhere else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakenet import DNS_ADDR, FakeInternet
from tests.support import Account, Server, node_server, signup


@pytest.fixture(scope="session")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeInternet]:
    with FakeInternet.start(tmp_path_factory.mktemp("internet")) as net:
        yield net


def internet_env(net: FakeInternet, uplink_subnet: str = "100.127.88.0/30") -> dict[str, str]:
    """A node server's settings for a gateway whose uplink is ``net``. Two gateways on one fake internet at
    once need different uplink subnets (the fake internet routes each subnet to one gateway)."""
    return {
        "CORRAL_UPLINK": f"netns:{net.name}",
        "CORRAL_UPLINK_SUBNET": uplink_subnet,
        "CORRAL_UPSTREAM_DNS": DNS_ADDR,
        "CORRAL_UPSTREAM_CA": str(net.ca_pem),
    }


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory, internet: FakeInternet) -> Iterator[Server]:
    with node_server(
        tmp_path_factory.mktemp("node"), CORRAL_WARM_POOL_SIZE="2", **internet_env(internet)
    ) as srv:
        yield srv


@pytest.fixture
def owner(node: Server) -> Iterator[Account]:
    acct = signup(node)
    yield acct
    acct.client.close()


@pytest.fixture
def stranger(node: Server) -> Iterator[Account]:
    acct = signup(node, first_name="Eve", last_name="Other")
    yield acct
    acct.client.close()
