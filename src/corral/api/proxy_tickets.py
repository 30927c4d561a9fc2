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
# over https the cookie is named with the __Host- prefix: a browser takes it only from the host itself
# (Secure, Path=/, no Domain), so a page of another VM under the same domain cannot set one that shadows it
SECURE_COOKIE = "__Host-corral_proxy"
TICKET_TTL = 60.0
SESSION_TTL = 3600.0  # CORRAL_PROXY_SESSION_TTL
KEY_CHECK_TTL = 5.0  # seconds a "this API key is not revoked" answer is trusted
MAX_COOKIE_VALUES = 16  # proxy cookie values tried per request (tossed copies beyond it are ignored)
MAX_ENTRIES = 100_000  # tickets and sessions each; the oldest go first beyond it


def origin_host(vm_id: str, port: int, domain: str) -> str:
    """The host name a VM's port is served at (a DNS label cannot hold '_': the VM id's is a '-')."""
    return f"{port}-{vm_id.replace('_', '-', 1)}.{domain}"


def parse_origin_host(host: str, domain: str) -> tuple[str, int] | None:
    """``(vm_id, port)`` of a ``Host`` header on the proxy origin, or None when it names no VM port."""
    name = host.strip().lower()
    if name.startswith("["):
        return None
    if ":" in name:
        name, _, port = name.rpartition(":")
        if not (port.isascii() and port.isdigit()):
            return None  # "host:18767@evil" is no host of ours
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


def cookie_name(scheme: str) -> str:
    """The proxy origin's cookie name for the scheme browsers use (``__Host-`` needs https)."""
    return SECURE_COOKIE if scheme == "https" else COOKIE


def without_ticket(raw_path: bytes, query: bytes) -> str:
    """Where a ticket's request is redirected: the same path and query, as the client escaped them, without
    the ticket parameter. Always a path on the same origin: leading slashes and backslashes are collapsed
    into one slash, so ``//evil.example`` or ``/\\evil.example`` cannot become another host."""
    kept = [
        p for p in query.split(b"&") if p and unquote_to_bytes(p.split(b"=", 1)[0]) != TICKET_PARAM.encode()
    ]
    path = b"/" + (raw_path or b"/").lstrip(b"/\\\t\r\n ")
    target = path + (b"?" + b"&".join(kept) if kept else b"")
    return "".join(chr(c) if 0x21 <= c <= 0x7E else f"%{c:02X}" for c in target)


def cookie_usable(method: str, fetch_site: str | None, fetch_mode: str | None) -> bool:
    """Whether a request may use the proxy cookie: not when another site (another VM's origin under the same
    domain included) makes it, except a top-level GET navigation (a link the user follows)."""
    if fetch_site not in ("cross-site", "same-site"):
        return True
    return fetch_mode == "navigate" and method in ("GET", "HEAD")


def origin_allowed(origin: str | None, method: str, *, websocket: bool, scheme: str, host: str) -> bool:
    """Whether a request on the proxy origin may go on, by its ``Origin`` header: a WebSocket handshake and
    every method but GET and HEAD must come from the page's own origin (``scheme://host[:port]`` as the
    request names it) when a browser says where it comes from, and any request that carries an ``Origin``
    must carry this one. Browsers send no Fetch Metadata on WebSocket handshakes nor to non-secure origins,
    and all VM origins under one domain are the same *site* (the Lax cookie goes along): without this check
    a page of one VM drives another VM's app with the user's session (cross-site WebSocket hijacking)."""
    if origin is None:
        # no browser omits Origin on a WebSocket or a cross-origin POST; a program without it holds the
        # cookie itself
        return True
    own = f"{scheme}://{host.strip().lower()}"
    return origin.strip().lower() == own


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
            for value in list(values)[:MAX_COOKIE_VALUES]:
                grant = self._sessions.get(value)
                if grant is not None and grant.expires > now and (grant.vm_id, grant.port) == (vm_id, port):
                    return grant
        return None

    def end_key(self, key_id: str) -> None:
        """Forget every ticket and session asked for with ``key_id`` (it was revoked)."""
        with self._lock:
            for table in (self._tickets, self._sessions):
                for old in [k for k, g in table.items() if g.key_id == key_id]:
                    del table[old]

    def _put(self, table: dict[str, Grant], key: str, grant: Grant) -> None:
        if len(table) >= self._max:
            now = self._clock()
            for old in [k for k, g in table.items() if g.expires <= now]:
                del table[old]
            while len(table) >= self._max:
                del table[next(iter(table))]
        table[key] = grant


class KeyCheck:
    """Cached answers to "is this API key still valid" (``KEY_CHECK_TTL`` seconds each), so a proxied request
    costs no database read when the answer is fresh; a revoked key stays revoked. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, ttl: float = KEY_CHECK_TTL) -> None:
        self._clock = clock
        self._ttl = ttl
        self._lock = threading.Lock()
        self._live: dict[str, float] = {}  # key id -> when the answer "live" was read
        self._dead: set[str] = set()

    def known(self, key_id: str) -> bool | None:
        """True or False when known, None when the database must be asked."""
        with self._lock:
            if key_id in self._dead:
                return False
            seen = self._live.get(key_id)
            if seen is not None and self._clock() - seen < self._ttl:
                return True
            return None

    def record(self, key_id: str, live: bool) -> None:
        with self._lock:
            if live:
                if len(self._live) >= MAX_ENTRIES:
                    self._live.clear()
                self._live[key_id] = self._clock()
            else:
                self._live.pop(key_id, None)
                if len(self._dead) >= MAX_ENTRIES:
                    self._dead.clear()
                self._dead.add(key_id)
