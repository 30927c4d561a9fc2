from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from corral.store.db import make_engine, migrate, session_factory
from tests.support import fresh_database


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A migrated database of the kind under test (SQLite, or PostgreSQL when CORRAL_TEST_DATABASE_URL is set)."""
    with fresh_database(tmp_path_factory.mktemp("db")) as url:
        eng = make_engine(url)
        migrate(eng)
        yield eng
        eng.dispose()


@pytest.fixture(scope="session")
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)
