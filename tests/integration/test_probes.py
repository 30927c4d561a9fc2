"""Readiness reflects the database: 503 ``not_ready`` when it does not answer, with the parts listed, without
taking liveness down."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import create_engine

from corral.api.app import create_app
from corral.api.deps import AppState
from corral.config import Settings
from tests.support import free_port


def test_readyz_is_503_when_the_database_is_gone(tmp_path: Path) -> None:
    settings = Settings.from_env({"CORRAL_DATA_DIR": str(tmp_path), "CORRAL_NODE": "off"})
    app = create_app(settings)
    state: AppState = app.state.corral
    with TestClient(app) as client:
        off = {"status": "off", "detail": None}
        ready = {
            "store": {"status": "ok", "detail": None},
            **dict.fromkeys(("node", "egress", "resolver", "ssh"), off),
        }
        assert client.get("/readyz").json() == {"status": "ready", "parts": ready}
        # point the app at a PostgreSQL address where nothing listens
        state.engine = create_engine(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none")
        resp = client.get("/readyz")
        assert resp.status_code == 503
        assert resp.json()["error"] == {
            "code": "not_ready",
            "message": "Not ready: store (the database does not answer)",
        }
        assert resp.json()["parts"]["store"] == {"status": "down", "detail": "the database does not answer"}
        assert client.get("/healthz").json() == {"status": "ok"}
    state.engine.dispose()
