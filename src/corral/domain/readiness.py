"""Readiness as data: each part of the server (store, node, egress, resolver, SSH gateway) is ``ok``, ``down``
(with why) or ``off`` (not run by this server's configuration); the server is ready when no part is down."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

PARTS = ("store", "node", "egress", "resolver", "ssh")

type State = Literal["ok", "down", "off"]


@dataclass(frozen=True)
class Part:
    state: State
    detail: str | None = None

    @classmethod
    def ok(cls) -> Part:
        return cls("ok")

    @classmethod
    def off(cls) -> Part:
        return cls("off")

    @classmethod
    def down(cls, detail: str) -> Part:
        return cls("down", detail)


OK, OFF = Part.ok(), Part.off()


def is_ready(parts: Mapping[str, Part]) -> bool:
    return all(part.state != "down" for part in parts.values())


def summary(parts: Mapping[str, Part]) -> str:
    """One sentence naming every part that is down, in ``PARTS`` order."""
    order = [name for name in PARTS if name in parts] + sorted(set(parts) - set(PARTS))
    down = [
        f"{name} ({parts[name].detail})" if parts[name].detail else name
        for name in order
        if parts[name].state == "down"
    ]
    return "Not ready: " + "; ".join(down) if down else "Ready"
