"""The egress audit trail: written in batches by the egress proxy, read by ``GET /v1/audit/egress``.

An allowed connection's (or HTTP request's) event is written when it is decided, with its ID chosen by the
proxy; when the connection ends (or the next request on it is decided) the proxy sends the event again with
the bytes it carried, and the row is updated (``bytes_up``/``bytes_down``, summed by ``GET /v1/usage``)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from corral.domain.errors import InvalidParameter
from corral.domain.ids import Prefix, new_id
from corral.domain.pagination import ListSpec, Page, PageRequest
from corral.store.paging import SortColumns, paginate
from corral.store.tables import EgressEvent

LIST = ListSpec(default_limit=50, max_limit=500, sorts=("timestamp",))
_SORTS: SortColumns = {
    "timestamp": (EgressEvent.timestamp, datetime),
}
PROTOCOLS = ("http", "tls", "tcp", "dns")
VERDICTS = ("allowed", "denied")
MODES = ("enforce", "warn")


@dataclass(frozen=True)
class NewEvent:
    user_id: str
    timestamp: datetime
    vm_id: str | None
    host: str | None
    cidr: str | None
    protocol: str
    verdict: str
    allowed: bool
    mode: str
    id: str | None = None  # chosen by the proxy when the event will be sent again with its bytes
    bytes_up: int | None = None
    bytes_down: int | None = None


def network_bounds(cidr: str) -> tuple[str, str]:
    """First and last address of a network as the address family and 32 hex digits (``4...``/``6...``):
    string order is address order within a family, and no IPv6 network contains an IPv4 address."""
    net = ipaddress.ip_network(cidr, strict=False)
    lo, hi = int(net.network_address), int(net.broadcast_address)
    return f"{net.version}{lo:032x}", f"{net.version}{hi:032x}"


def normalise_host(host: str) -> str:
    return host.lower().rstrip(".")


def record(session: Session, events: Iterable[NewEvent]) -> list[str]:
    """Insert a batch of events in one statement; an event whose ID is already stored updates its byte
    counts (within a batch, the last event of an ID wins). Returns the IDs."""
    rows: dict[str, dict[str, Any]] = {}
    for ev in events:
        if ev.protocol not in PROTOCOLS or ev.verdict not in VERDICTS or ev.mode not in MODES:
            raise ValueError(f"bad audit event: {ev}")
        lo, hi = network_bounds(ev.cidr) if ev.cidr else (None, None)
        ident = ev.id or new_id(Prefix.EGRESS_EVENT)
        rows[ident] = {
            "id": ident,
            "user_id": ev.user_id,
            "timestamp": ev.timestamp,
            "vm_id": ev.vm_id,
            "host": normalise_host(ev.host) if ev.host else None,
            "cidr": str(ipaddress.ip_network(ev.cidr, strict=False)) if ev.cidr else None,
            "net_lo": lo,
            "net_hi": hi,
            "protocol": ev.protocol,
            "verdict": ev.verdict,
            "allowed": ev.allowed,
            "mode": ev.mode,
            "bytes_up": ev.bytes_up,
            "bytes_down": ev.bytes_down,
        }
    chosen = [i for i, ev in rows.items() if ev["bytes_up"] is not None]
    stored = (
        set(session.scalars(select(EgressEvent.id).where(EgressEvent.id.in_(chosen)))) if chosen else set()
    )
    for ident in stored:
        row = rows.pop(ident)
        session.execute(
            update(EgressEvent)
            .where(EgressEvent.id == ident)
            .values(bytes_up=row["bytes_up"], bytes_down=row["bytes_down"])
        )
    if rows:
        session.execute(insert(EgressEvent), list(rows.values()))
    return list(rows) + sorted(stored)


@dataclass(frozen=True)
class EventFilter:
    vm_id: str | None = None
    verdict: str | None = None
    allowed: bool | None = None
    mode: str | None = None
    host: str | None = None
    cidr: str | None = None
    protocol: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def _check_choice(name: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise InvalidParameter(f"{name} must be one of: {', '.join(choices)}")


def list_events(session: Session, user_id: str, request: PageRequest, f: EventFilter) -> Page[EgressEvent]:
    _check_choice("verdict", f.verdict, VERDICTS)
    _check_choice("mode", f.mode, MODES)
    _check_choice("protocol", f.protocol, PROTOCOLS)
    stmt = select(EgressEvent).where(EgressEvent.user_id == user_id)
    for column, value in (
        (EgressEvent.vm_id, f.vm_id),
        (EgressEvent.verdict, f.verdict),
        (EgressEvent.allowed, f.allowed),
        (EgressEvent.mode, f.mode),
        (EgressEvent.protocol, f.protocol),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    if f.host is not None:
        stmt = stmt.where(EgressEvent.host == normalise_host(f.host))
    if f.cidr is not None:
        try:
            lo, hi = network_bounds(f.cidr)
        except ValueError:
            raise InvalidParameter(f"cidr {f.cidr!r} is not a valid network") from None
        # the event's address (or network) lies inside the filter's network
        stmt = stmt.where(EgressEvent.net_lo >= lo, EgressEvent.net_hi <= hi)
    if f.since is not None:
        stmt = stmt.where(EgressEvent.timestamp > f.since)
    if f.until is not None:
        stmt = stmt.where(EgressEvent.timestamp < f.until)

    return paginate(
        session,
        stmt,
        request=request,
        sort_columns=_SORTS,
        id_column=EgressEvent.id,
        render=lambda r: r,
    )
