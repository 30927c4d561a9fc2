"""Who may read GET /v1/node (a real server without a node: an operator gets 503 node_unavailable, anyone
else 403 forbidden): the e-mails in CORRAL_OPERATOR_EMAILS, or the first user when none are set."""

from __future__ import annotations

from pathlib import Path

from tests.support import running_server, signup


def test_the_first_user_is_the_operator_by_default(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        first, second = signup(srv), signup(srv)
        assert first.client.get("/v1/node").json()["error"]["code"] == "node_unavailable"
        refused = second.client.get("/v1/node")
        assert refused.status_code == 403
        assert refused.json()["error"] == {
            "code": "forbidden",
            "message": "Only an operator can read the node (see CORRAL_OPERATOR_EMAILS)",
        }
        assert srv.client().get("/v1/node").status_code == 401


def test_operator_emails_name_the_operators(tmp_path: Path) -> None:
    with running_server(tmp_path, CORRAL_OPERATOR_EMAILS="ops@example.org") as srv:
        first = signup(srv)
        assert first.client.get("/v1/node").status_code == 403  # the first user is no operator now
        with srv.client() as anon:
            resp = anon.post(
                "/v1/users",
                json={
                    "first_name": "O",
                    "last_name": "P",
                    "email": "Ops@Example.org",
                    "password": "s3cureP@ssword",
                },
            )
        assert resp.status_code == 201, resp.text
        ops = srv.client(resp.json()["api_key"]["token"])
        assert ops.get("/v1/node").status_code == 503
