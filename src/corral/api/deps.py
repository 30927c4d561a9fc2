"""Dependencies the routers declare with ``Annotated``: the database session, the caller, rate limits."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import HTTPConnection

from corral.api.bulkheads import Bulkheads
from corral.config import Settings
from corral.domain.errors import RateLimited, Unauthorized
from corral.domain.ratelimit import RateLimiter
from corral.egress.supervisor import EgressSupervisor
from corral.services.context import Services
from corral.services.lifecycle import Lifecycle
from corral.services.state import StateService
from corral.services.users import Principal, authenticate, needs_touch, touch
from corral.ssh.gateway import SshGateway


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    services: Services
    key_limiter: RateLimiter
    anon_limiter: RateLimiter
    lifecycle: Lifecycle | None = None
    reads: sessionmaker[Session] | None = None  # read-only sessions (no write lock on SQLite)
    saved_state: StateService | None = None  # snapshots, hibernate, fork, checkpoints
    ssh: SshGateway | None = None  # the SSH gateway, while it listens
    bulkheads: Bulkheads | None = None  # caps on concurrent execs and sessions (api/bulkheads.py)
    egress: EgressSupervisor | None = None  # the egress process's supervisor (probes for /readyz)


def state(request: Request) -> AppState:
    st = request.app.state.corral
    assert isinstance(st, AppState)
    return st


StateDep = Annotated[AppState, Depends(state)]


def db(st: StateDep) -> Iterator[Session]:
    """One transaction per request: committed when the handler returns, rolled back when it raises."""
    with st.sessions() as session, session.begin():
        yield session


SessionDep = Annotated[Session, Depends(db, scope="function")]  # commit before the response is sent


def charge(st: AppState, limiter: RateLimiter, key: str) -> None:
    wait = limiter.take(key, st.services.clock.monotonic())
    if wait:
        raise RateLimited(f"Too many requests; retry in {wait} s", retry_after=wait)


def principal(request: Request, st: StateDep) -> Principal:
    return authenticate_connection(request, st, allow_query=False)


def connection_state(conn: HTTPConnection) -> AppState:
    st = conn.app.state.corral
    assert isinstance(st, AppState)
    return st


def authenticate_connection(conn: HTTPConnection, st: AppState, *, allow_query: bool) -> Principal:
    """The caller of a request or WebSocket, by its ``Authorization: Bearer`` header, or (where a browser
    cannot set headers: terminal, shell, proxy) by ``?token=`` when ``allow_query``."""
    header = conn.headers.get("authorization", "")
    query = conn.query_params.get("token", "") if allow_query else ""
    if not header and not query:
        charge(st, st.anon_limiter, client_key(conn))
        where = " or as ?token=<api_key>" if allow_query else ""
        raise Unauthorized(f"Missing API key: pass it as 'Authorization: Bearer <api_key>'{where}")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            charge(st, st.anon_limiter, client_key(conn))
            raise Unauthorized("Authorization header must be 'Bearer <api_key>'")
    else:
        token = query
    with (st.reads or st.sessions)() as session:
        who = authenticate(session, token.strip())
    if who is None:
        charge(st, st.anon_limiter, client_key(conn))
        raise Unauthorized("Invalid API key")
    charge(st, st.key_limiter, who.key_id)
    now = st.services.clock.now()
    if needs_touch(who, now):  # the key's last use, at most once a minute per key
        with st.sessions() as session, session.begin():
            touch(session, who.key_id, now)
    return who


def query_principal(conn: HTTPConnection) -> Principal:
    return authenticate_connection(conn, connection_state(conn), allow_query=True)


def client_key(request: HTTPConnection) -> str:
    """The client's address as a rate-limit key; IPv6 clients by their /64 (one host holds a whole /64)."""
    host = request.client.host if request.client else "unknown"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if addr.version == 6 and addr.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return host


def anonymous_limit(request: Request, st: StateDep) -> None:
    charge(st, st.anon_limiter, client_key(request))


PrincipalDep = Annotated[Principal, Depends(principal)]
# header or ?token= (terminal, shell, proxy: what a browser can open)
QueryPrincipalDep = Annotated[Principal, Depends(query_principal)]
AnonLimit = Depends(anonymous_limit)
