"""The egress process's own health report (what the proxy answers the supervisor's probe) and its handler of
event-loop errors: running out of descriptors is one line per interval, anything else goes on as before."""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any

import pytest

from corral.egress.limits import Throttle
from corral.egress.main import POLICY_STALE, health_line, quiet_resource_errors
from corral.egress.state import Snapshot, StateWatcher


def watcher_aged(age: float | None) -> StateWatcher:
    now = [1000.0]
    watcher = StateWatcher(Snapshot, interval=60, clock=lambda: now[0])
    if age is not None:
        watcher.reload()
        now[0] += age
    return watcher


def test_health_line_says_ok_while_the_policy_is_fresh_and_stale_after() -> None:
    assert health_line(watcher_aged(0.4)) == "ok policy_age=0.4"
    assert health_line(watcher_aged(POLICY_STALE + 1)) == f"stale policy_age={POLICY_STALE + 1:.1f}"
    assert health_line(watcher_aged(None)) == "stale policy_age=never"


def test_out_of_descriptors_is_reported_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    passed: list[dict[str, Any]] = []
    handler = quiet_resource_errors(
        lambda _loop, ctx: passed.append(ctx), Throttle(10.0, clock=lambda: now[0])
    )
    loop = asyncio.new_event_loop()
    try:
        emfile = {
            "message": "socket.accept() out of system resource",
            "exception": OSError(errno.EMFILE, "x"),
        }
        with caplog.at_level(logging.ERROR, logger="corral.egress.main"):
            for _ in range(1000):  # asyncio's accept loop: up to 100 a round
                handler(loop, emfile)
            now[0] = 10.5
            handler(loop, emfile)
            other = {"message": "boom", "exception": ValueError("x")}
            handler(loop, other)
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "EMFILE" in lines[0]
    assert "999 more like this" in lines[1]
    assert not any(r.exc_info for r in caplog.records)
    assert passed == [other]  # anything else reaches mitmproxy's handler untouched
