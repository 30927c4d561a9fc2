"""No credential in a log line: the filter every handler of ``corral serve`` carries."""

from __future__ import annotations

import io
import logging

from uvicorn.logging import AccessFormatter

from corral.cli.logs import RedactSecrets, redact, uvicorn_log_config


def test_query_credentials_and_keys_are_redacted() -> None:
    line = "GET /v1/vms/vm_a/terminal?cols=80&token=corral_live_abcDEF123&rows=24 HTTP/1.1"
    assert redact(line) == "GET /v1/vms/vm_a/terminal?cols=80&token=[redacted]&rows=24 HTTP/1.1"
    assert redact("/x?corral_ticket=Ab-_9&y=1") == "/x?corral_ticket=[redacted]&y=1"
    assert redact("key corral_live_ZZ9 leaked") == "key [redacted] leaked"
    assert redact("/x?mytoken=keep") == "/x?mytoken=keep"


def test_uvicorns_access_log_keeps_its_shape() -> None:
    config = uvicorn_log_config()
    assert all("redact" in h["filters"] for h in config["handlers"].values())
    assert config["filters"]["redact"]["()"] == "corral.cli.logs.RedactSecrets"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    handler.setFormatter(AccessFormatter(fmt=config["formatters"]["access"]["fmt"], use_colors=False))
    logger = logging.getLogger(f"test.access.{id(stream)}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.info(
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:5000",
        "GET",
        "/v1/vms/vm_a/shell?token=corral_live_secret",
        "1.1",
        101,
    )
    line = stream.getvalue()
    assert '127.0.0.1:5000 - "GET /v1/vms/vm_a/shell?token=[redacted] HTTP/1.1" 101' in line
    assert "secret" not in line


def test_the_filter_redacts_records_of_any_logger() -> None:
    record = logging.LogRecord("corral.x", logging.INFO, __file__, 1, "saw %s", ("corral_live_k",), None)
    assert RedactSecrets().filter(record)
    assert record.getMessage() == "saw [redacted]"
