"""The guest proxy's own origin: host names, one-time tickets and the cookie they become (logic only, kept in
memory; nothing here can call the API, which accepts API keys only).

- A VM's port is served at ``<port>-<vm id with '-' for '_'>.<domain>`` (``8080-vm-k3mf9xvw2p.localhost``):
  each VM and port is its own origin, so a page of one cannot read another's, nor the API's.
- ``POST /v1/vms/{id}/proxy-ticket`` (an API key) gives a URL there carrying a ticket: valid for
  ``TICKET_TTL`` seconds, for that VM and port only, and once (a ticket presented is spent, whether it
  matched or not).
- Opening it exchanges the ticket for a cookie (HttpOnly, host-only, ``SESSION_TTL``) bound to the same VM
  and port, and redirects to the URL without the ticket: the ticket never reaches the guest nor stays in the
  page's address.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from corral.domain.ids import Prefix, has_prefix

TICKET_PARAM = "corral_ticket"
COOKIE = "corral_proxy"
TICKET_TTL = 60.0
SESSION_TTL = 8 * 3600.0
MAX_ENTRIES = 100_000  # tickets and sessions each; the oldest go first beyond it


def origin_host(vm_id: str, port: int, domain: str) -> str:
    """The host name a VM's port is served at (a DNS label cannot hold '_': the VM id's is a '-')."""
    return f"{port}-{vm_id.replace('_', '-', 1)}.{domain}"


def parse_origin_host(host: str, domain: str) -> tuple[str, int] | None:
    """``(vm_id, port)`` of a ``Host`` header on the proxy origin, or None when it names no VM port."""
    name = host.strip().lower()
    if name.startswith("["):
        return None
    name = name.rsplit(":", 1)[0] if ":" in name else name
    label, dot, rest = name.partition(".")
    if not dot or rest.rstrip(".") != domain:
        return None
    port_text, dash, vm_part = label.partition("-")
    if not dash or not port_text.isdigit() or port_text.startswith("0") or not 1 <= int(port_text) <= 65535:
        return None
    vm_id = vm_part.replace("-", "_", 1)
    if not has_prefix(vm_id, Prefix.VM):
        return None
    return vm_id, int(port_text)


def without_ticket(raw_path: bytes, query: bytes) -> str:
    """Where a ticket's request is redirected: the same path and query, as the client escaped them, without
    the ticket parameter."""
    kept = [
        p for p in query.split(b"&") if p and unquote_to_bytes(p.split(b"=", 1)[0]) != TICKET_PARAM.encode()
    ]
    target = (raw_path or b"/") + (b"?" + b"&".join(kept) if kept else b"")
    return "".join(chr(c) if 0x21 <= c <= 0x7E else f"%{c:02X}" for c in target)


def cookie_usable(method: str, fetch_site: str | None, fetch_mode: str | None) -> bool:
    """Whether a request may use the proxy cookie: not when another site (another VM's origin under the same
    domain included) makes it, except a top-level GET navigation (a link the user follows)."""
    if fetch_site not in ("cross-site", "same-site"):
        return True
    return fetch_mode == "navigate" and method in ("GET", "HEAD")


@dataclass(frozen=True)
class Grant:
    user_id: str
    key_id: str  # the API key the ticket was asked with: revoking it ends the grant
    vm_id: str
    port: int
    expires: float  # on the book's clock


class TicketBook:
    """Tickets and sessions of the proxy origin, in this process's memory (a restart forgets them: open a
    new ticket). Thread-safe."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        ticket_ttl: float = TICKET_TTL,
        session_ttl: float = SESSION_TTL,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._clock = clock
        self.ticket_ttl = ticket_ttl
        self.session_ttl = session_ttl
        self._max = max_entries
        self._lock = threading.Lock()
        self._tickets: dict[str, Grant] = {}
        self._sessions: dict[str, Grant] = {}

    def issue(self, user_id: str, key_id: str, vm_id: str, port: int) -> str:
        """A new ticket for ``user_id``'s VM and port, asked for with the API key ``key_id``."""
        ticket = secrets.token_urlsafe(32)
        expires = self._clock() + self.ticket_ttl
        with self._lock:
            self._put(self._tickets, ticket, Grant(user_id, key_id, vm_id, port, expires))
        return ticket

    def redeem(self, ticket: str, vm_id: str, port: int) -> str | None:
        """The value of a new session cookie for the ticket's VM and port, or None when the ticket is unknown,
        spent, expired or for another VM or port. The ticket is spent either way."""
        with self._lock:
            grant = self._tickets.pop(ticket, None)
            if grant is None or grant.expires <= self._clock() or (grant.vm_id, grant.port) != (vm_id, port):
                return None
            session = secrets.token_urlsafe(32)
            expires = self._clock() + self.session_ttl
            self._put(self._sessions, session, Grant(grant.user_id, grant.key_id, vm_id, port, expires))
        return session

    def session(self, values: Iterable[str], vm_id: str, port: int) -> Grant | None:
        """The grant of the first cookie value that is a live session for this VM and port."""
        now = self._clock()
        with self._lock:
            for value in values:
                grant = self._sessions.get(value)
                if grant is not None and grant.expires > now and (grant.vm_id, grant.port) == (vm_id, port):
                    return grant
        return None

    def _put(self, table: dict[str, Grant], key: str, grant: Grant) -> None:
        if len(table) >= self._max:
            now = self._clock()
            for old in [k for k, g in table.items() if g.expires <= now]:
                del table[old]
            while len(table) >= self._max:
                del table[next(iter(table))]
        table[key] = grant
