"""Readiness from its parts: down anywhere is not ready, off is not down; the message names what is down."""

from __future__ import annotations

from corral.domain.readiness import OFF, OK, Part, is_ready, summary


def test_ready_when_nothing_is_down() -> None:
    parts = {"store": OK, "node": OK, "egress": OK, "resolver": OK, "ssh": OFF}
    assert is_ready(parts)
    assert summary(parts) == "Ready"


def test_one_part_down_is_not_ready_and_named_in_order() -> None:
    parts = {
        "ssh": OK,
        "resolver": Part.down("the resolver did not answer within 2 s"),
        "store": OK,
        "egress": Part.down("restarting"),
        "node": OK,
    }
    assert not is_ready(parts)
    assert (
        summary(parts) == "Not ready: egress (restarting); resolver (the resolver did not answer within 2 s)"
    )


def test_a_part_without_detail_is_named_alone() -> None:
    assert summary({"store": Part("down")}) == "Not ready: store"
    assert not is_ready({"store": Part("down"), "node": OFF})
