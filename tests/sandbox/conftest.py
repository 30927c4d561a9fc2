"""Real sandboxes on this host: one node server for the session (warm pool of 2), accounts on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Account, Server, node_server, signup


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with node_server(tmp_path_factory.mktemp("node"), CORRAL_WARM_POOL_SIZE="2") as srv:
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
