from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Account, Server, running_server, signup


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture
def account(server: Server) -> Iterator[Account]:
    acct = signup(server)
    yield acct
    acct.client.close()


@pytest.fixture
def other_account(server: Server) -> Iterator[Account]:
    acct = signup(server, first_name="Bob", last_name="Jones")
    yield acct
    acct.client.close()
