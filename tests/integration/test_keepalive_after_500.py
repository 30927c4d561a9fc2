"""An unhandled error answers the 500 envelope and leaves the keep-alive connection usable (finding D6).

The fault is real: the table behind ``/v1/env`` is renamed under the running server, so its query fails with
an error no handler knows (on SQLite and PostgreSQL alike); the table is then put back and the next request
goes over the same HTTP/1.1 connection.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import create_engine, text

from corral.store.db import normalise_url
from tests.support import running_server, signup


def _rename(url: str, old: str, new: str) -> None:
    engine = create_engine(normalise_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))
    finally:
        engine.dispose()


def test_a_500_keeps_the_connection_alive(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        alice = signup(server)
        alice.client.close()
        where = urlsplit(server.url)
        conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=30)
        headers = {"Authorization": f"Bearer {alice.token}"}
        try:
            conn.request("GET", "/v1/env", headers=headers)
            first = conn.getresponse()
            assert first.status == 200
            first.read()
            sock = conn.sock
            _rename(server.database_url, "env_vars", "env_vars_moved")
            try:
                conn.request("GET", "/v1/env", headers=headers)
                failed = conn.getresponse()
                body = json.loads(failed.read())
                assert failed.status == 500
                assert body == {"error": {"code": "internal_error", "message": "Internal server error"}}
                assert (failed.getheader("connection") or "").lower() != "close"
            finally:
                _rename(server.database_url, "env_vars_moved", "env_vars")
            conn.request("GET", "/v1/env", headers=headers)
            after = conn.getresponse()
            assert after.status == 200, after.read()
            assert json.loads(after.read())["data"] == []
            assert conn.sock is sock  # the same TCP connection, not a reconnect
        finally:
            conn.close()
        assert "unhandled error on GET /v1/env" in server.log.read_text()
