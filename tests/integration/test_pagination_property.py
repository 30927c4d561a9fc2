"""Paging through any list with any limit returns every row exactly once, in order, even while rows are
inserted and deleted between pages (real database: SQLite, or PostgreSQL in the PostgreSQL run)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker

from corral.domain.clock import FakeClock
from corral.domain.ids import Prefix, new_id
from corral.domain.pagination import ListSpec, Order, Page, page_request
from corral.security.secretbox import AesGcmCipher, SecretValue
from corral.services import audit, egress, env
from corral.services import secrets as secret_service
from corral.services.context import Services
from corral.store.db import transaction
from corral.store.tables import User

CIPHER = AesGcmCipher(b"k" * 32)


@dataclass(frozen=True)
class Resource:
    name: str
    spec: ListSpec
    create: Callable[[Session, FakeClock, str, int], str]  # returns the new row's id
    delete: Callable[[Session, str, str], None]
    page: Callable[[Session, str, Any], Page[Any]]
    sort_key: Callable[[Any, str], Any]


def _env_create(s: Session, clock: FakeClock, user: str, n: int) -> str:
    return env.put_env(s, clock, user, f"K{n}_{secrets.token_hex(3)}", "v").id


def _env_delete(s: Session, user: str, ident: str) -> None:
    row = next(
        r for r in env.list_env(s, user, page_request(env.LIST, limit=200, cursor=None)).data if r.id == ident
    )
    env.delete_env(s, user, row.key)


def _secret_create(s: Session, clock: FakeClock, user: str, n: int) -> str:
    name = f"{secrets.choice(['a', 'b', 'c'])}-{n}-{secrets.token_hex(2)}"
    view = secret_service.create_secret(
        s,
        Services(clock=clock, cipher=CIPHER),
        user,
        name=name,
        secret=SecretValue("x"),
        env_var=f"E{n}_{secrets.token_hex(3).upper()}",
        hosts=None,
        comment=None,
    )
    return view.id


def _rule_create(s: Session, clock: FakeClock, user: str, n: int) -> str:
    host = None if n % 3 == 0 else f"h{n % 4}.example.com"  # NULL hosts and ties on host
    cidr = f"10.{n % 250}.0.0/16" if host is None else None
    return egress.create_rule(
        s, clock, user, egress.NewRule(name=None, host=host, cidr=cidr, comment=None)
    ).id


def _event_create(s: Session, clock: FakeClock, user: str, n: int) -> str:
    ev = audit.NewEvent(
        user_id=user,
        timestamp=clock.now(),
        vm_id=None,
        host=f"h{n}.example.com",
        cidr=None,
        protocol="tls",
        verdict="allowed",
        allowed=True,
        mode="enforce",
    )
    return audit.record(s, [ev])[0]


def _event_delete(s: Session, user: str, ident: str) -> None:
    from corral.store.tables import EgressEvent

    row = s.get(EgressEvent, ident)
    assert row is not None
    s.delete(row)


RESOURCES = [
    Resource(
        "env",
        env.LIST,
        _env_create,
        _env_delete,
        lambda s, u, req: env.list_env(s, u, req),
        lambda r, sort: (r.created_at, r.id),
    ),
    Resource(
        "secrets",
        secret_service.LIST,
        _secret_create,
        lambda s, u, i: secret_service.delete_secret(s, u, i),
        lambda s, u, req: secret_service.list_secrets(s, u, req, name=None),
        lambda r, sort: (r.name if sort == "name" else r.created_at, r.id),
    ),
    Resource(
        "egress_rules",
        egress.LIST_RULES,
        _rule_create,
        lambda s, u, i: egress.delete_rule(s, u, i),
        lambda s, u, req: egress.list_rules(s, u, req),
        lambda r, sort: ((r.host or "") if sort == "host" else r.created_at, r.id),
    ),
    Resource(
        "audit",
        audit.LIST,
        _event_create,
        _event_delete,
        lambda s, u, req: audit.list_events(s, u, req, audit.EventFilter()),
        lambda r, sort: (r.timestamp, r.id),
    ),
]


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    resource = draw(st.sampled_from(RESOURCES))
    return {
        "resource": resource,
        "rows": draw(st.integers(min_value=0, max_value=25)),
        "limit": draw(st.integers(min_value=1, max_value=resource.spec.max_limit)),
        "small_limit": draw(st.integers(min_value=1, max_value=7)),
        "use_small": draw(st.booleans()),
        "sort": draw(st.sampled_from(resource.spec.sorts)),
        "order": draw(st.sampled_from([Order.ASC, Order.DESC])),
        "ticks": draw(st.lists(st.sampled_from([0.0, 0.0, 0.000001, 0.5, 2.0]), min_size=40, max_size=40)),
        "churn": draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=8, max_size=8)),
    }


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_paging_returns_every_row_exactly_once(
    sessions: sessionmaker[Session], scenario: dict[str, Any]
) -> None:
    res: Resource = scenario["resource"]
    clock = FakeClock(datetime(2026, 3, 1, tzinfo=UTC))
    limit = scenario["small_limit"] if scenario["use_small"] else scenario["limit"]
    with transaction(sessions) as s:
        user = signup_user(s, clock)
        ids = []
        for n in range(scenario["rows"]):
            clock.advance(scenario["ticks"][n % 40])
            ids.append(res.create(s, clock, user, n))

    initial = set(ids)
    deleted: set[str] = set()
    inserted: set[str] = set()
    seen: list[str] = []
    keys: list[Any] = []
    cursor: str | None = None
    counter = 1000
    for step in range(200):
        with transaction(sessions) as s:
            req = page_request(
                res.spec, limit=limit, cursor=cursor, sort=scenario["sort"], order=scenario["order"].value
            )
            page = res.page(s, user, req)
        assert len(page.data) <= limit
        seen.extend(r.id for r in page.data)
        keys.extend(res.sort_key(r, scenario["sort"]) for r in page.data)
        if not page.has_more:
            assert page.cursor is None
            break
        assert page.cursor is not None
        cursor = page.cursor
        # churn between pages: insert some rows, delete some rows that were there from the start
        # (only for the first pages, so that ascending lists that keep growing at the end still finish)
        adds, dels = scenario["churn"][step] if step < 8 else (0, 0)
        with transaction(sessions) as s:
            for _ in range(adds):
                clock.advance(0.25)
                counter += 1
                inserted.add(res.create(s, clock, user, counter))
            for ident in sorted(initial - deleted)[:dels]:
                res.delete(s, user, ident)
                deleted.add(ident)
    else:
        raise AssertionError("paging did not finish")

    assert len(seen) == len(set(seen)), "a row was returned twice"
    assert initial - deleted <= set(seen), "a row present throughout was skipped"
    assert set(seen) <= initial | inserted
    assert keys == sorted(keys, reverse=scenario["order"] is Order.DESC), "pages are not in sort order"


def signup_user(s: Session, clock: FakeClock) -> str:
    """A user row straight into the store (signup's password hashing would dominate the run time)."""
    user = User(
        id=new_id(Prefix.USER),
        first_name="P",
        last_name="Q",
        email=f"p-{secrets.token_hex(8)}@example.com",
        password_hash="-",
        email_verified=False,
        created_at=clock.now(),
    )
    s.add(user)
    s.flush()
    return user.id


def test_cursor_survives_deletion_of_its_row(sessions: sessionmaker[Session]) -> None:
    clock = FakeClock()
    with transaction(sessions) as s:
        user = signup_user(s, clock)
        for n in range(5):
            clock.advance(1)
            env.put_env(s, clock, user, f"K{n}", "v")
    with transaction(sessions) as s:
        first = env.list_env(s, user, page_request(env.LIST, limit=2, cursor=None))
        assert [r.key for r in first.data] == ["K4", "K3"]
        env.delete_env(s, user, "K3")  # the row the cursor points at
    with transaction(sessions) as s:
        second = env.list_env(s, user, page_request(env.LIST, limit=2, cursor=first.cursor))
    assert [r.key for r in second.data] == ["K2", "K1"]
    assert timedelta(0) < clock.now() - datetime(2026, 1, 1, tzinfo=UTC)
