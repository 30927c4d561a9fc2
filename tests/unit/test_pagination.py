"""Cursor pagination, pure part: opaque cursors and list parameter validation."""

from __future__ import annotations

import base64
import contextlib
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.domain.errors import InvalidCursor, InvalidParameter
from corral.domain.pagination import (
    ListSpec,
    Order,
    PageRequest,
    SortKey,
    decode_cursor,
    encode_cursor,
    page_request,
)

_offsets = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
# instants the store can hold: convertible to UTC without leaving datetime's range
_aware = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC) | _offsets
)
_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=100)
_keys: st.SearchStrategy[SortKey] = _text | st.integers(-(2**63), 2**63) | _aware
_idents = st.from_regex(r"[a-z]{1,5}_[0-9a-z]{1,64}", fullmatch=True)
_sorts = st.sampled_from(["created_at", "name", "updated_at"])
_orders = st.sampled_from(Order)


def _raw(payload: object) -> str:
    """A cursor made by hand from any JSON payload, encoded the way the real ones are."""
    text = json.dumps(payload, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@settings(max_examples=150)
@given(_sorts, _orders, _keys, _idents)
def test_cursor_round_trip(sort: str, order: Order, key: SortKey, ident: str) -> None:
    cursor = encode_cursor(sort, order, key, ident)
    got_key, got_ident = decode_cursor(cursor, sort, order)
    assert got_ident == ident
    assert type(got_key) is type(key)
    assert got_key == key  # datetimes: the same instant
    if isinstance(key, datetime):
        assert isinstance(got_key, datetime)
        assert got_key.utcoffset() == timedelta(0)  # decoded cursors are in UTC, like the store's values


@given(_sorts, _orders, _keys, _idents)
def test_cursor_is_url_safe(sort: str, order: Order, key: SortKey, ident: str) -> None:
    cursor = encode_cursor(sort, order, key, ident)
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@given(_orders, _keys, _idents)
def test_cursor_is_bound_to_its_sort_and_order(order: Order, key: SortKey, ident: str) -> None:
    cursor = encode_cursor("name", order, key, ident)
    other = Order.ASC if order is Order.DESC else Order.DESC
    with pytest.raises(InvalidCursor, match="sort=name"):
        decode_cursor(cursor, "created_at", order)
    with pytest.raises(InvalidCursor, match=f"order={order.value}"):
        decode_cursor(cursor, "name", other)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300)
@given(st.text(max_size=3000) | st.binary(max_size=1600).map(lambda b: base64.urlsafe_b64encode(b).decode()))
def test_decode_raises_only_invalid_cursor_on_any_string(cursor: str) -> None:
    with contextlib.suppress(InvalidCursor):
        decode_cursor(cursor, "created_at", Order.DESC)


@settings(max_examples=100)
@given(
    _json
    | st.tuples(st.just(1), st.just("created_at"), st.just("desc"), _json, _json).map(list)
    | st.tuples(
        st.just(1),
        st.just("created_at"),
        st.just("desc"),
        st.tuples(st.text(max_size=2), _json).map(list),
        _json,
    ).map(list)
)
def test_decode_raises_only_invalid_cursor_on_any_json(payload: object) -> None:
    with contextlib.suppress(InvalidCursor):
        decode_cursor(_raw(payload), "created_at", Order.DESC)


def test_deeply_nested_cursor_is_an_invalid_cursor() -> None:
    # 1500 '[' encode to 2000 characters, under the 2048 limit; json.loads then recurses too deep.
    cursor = base64.urlsafe_b64encode(b"[" * 1500).decode()
    assert len(cursor) <= 2048
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor, "created_at", Order.DESC)


@pytest.mark.parametrize(
    "payload",
    [
        [2, "created_at", "desc", ["s", "x"], "vm_1"],  # unknown version
        ["1", "created_at", "desc", ["s", "x"], "vm_1"],
        [1, "created_at", "desc", ["s", "x"]],  # too short
        [1, "created_at", "desc", ["s", "x"], "vm_1", "extra"],
        [1, "created_at", "desc", ["s", "x"], 5],  # id not a string
        [1, "created_at", "desc", ["x", "x"], "vm_1"],  # unknown key tag
        [1, "created_at", "desc", ["s", 5], "vm_1"],
        [1, "created_at", "desc", ["i", "5"], "vm_1"],
        [1, "created_at", "desc", ["i", 5.0], "vm_1"],
        [1, "created_at", "desc", ["i", True], "vm_1"],  # a bool is not an int key
        [1, "created_at", "desc", ["t", "2026-01-01T00:00:00"], "vm_1"],  # naive time
        [1, "created_at", "desc", ["t", "yesterday"], "vm_1"],
        [1, "created_at", "desc", ["t", 5], "vm_1"],
        [1, "created_at", "desc", "x", "vm_1"],
        {"sort": "created_at"},
        "cursor",
        None,
        [],
    ],
)
def test_malformed_payloads(payload: object) -> None:
    with pytest.raises(InvalidCursor, match="malformed"):
        decode_cursor(_raw(payload), "created_at", Order.DESC)


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "a",  # one character: impossible base64 length
        "!!!!",
        "not base64 at all",
        "é",
        base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),  # not UTF-8
        base64.urlsafe_b64encode(b"{not json").decode(),
        "A" * 2049,
    ],
)
def test_malformed_strings(cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor, "created_at", Order.DESC)


def test_overlong_cursor_is_rejected_before_decoding() -> None:
    cursor = encode_cursor("name", Order.ASC, "k" * 2000, "vm_1")
    assert len(cursor) > 2048
    with pytest.raises(InvalidCursor, match="malformed"):
        decode_cursor(cursor, "name", Order.ASC)


def test_cursor_with_or_without_padding() -> None:
    cursor = encode_cursor("created_at", Order.DESC, 7, "vm_1")
    padded = cursor + "=" * (-len(cursor) % 4)
    assert decode_cursor(padded, "created_at", Order.DESC) == (7, "vm_1")


SPEC = ListSpec(default_limit=20, max_limit=100, sorts=("created_at", "name"))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, PageRequest(limit=20, sort="created_at", order=Order.DESC)),
        ({"limit": 1}, PageRequest(limit=1, sort="created_at", order=Order.DESC)),
        ({"limit": 100}, PageRequest(limit=100, sort="created_at", order=Order.DESC)),
        ({"sort": "name"}, PageRequest(limit=20, sort="name", order=Order.DESC)),
        ({"order": "asc"}, PageRequest(limit=20, sort="created_at", order=Order.ASC)),
        (
            {"sort": "name", "order": "asc", "cursor": encode_cursor("name", Order.ASC, "bob", "usr_1")},
            PageRequest(limit=20, sort="name", order=Order.ASC, after=("bob", "usr_1")),
        ),
    ],
)
def test_page_request(kwargs: dict[str, object], expected: PageRequest) -> None:
    args: dict[str, object] = {"limit": None, "cursor": None, **kwargs}
    assert page_request(SPEC, **args) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"limit": 0}, "limit must be between 1 and 100"),
        ({"limit": -1}, "limit must be between 1 and 100"),
        ({"limit": 101}, "limit must be between 1 and 100"),
        ({"sort": "size"}, "sort must be one of: created_at, name"),
        ({"sort": ""}, "sort must be one of: created_at, name"),
        ({"order": "ASC"}, "order must be one of: asc, desc"),
        ({"order": "up"}, "order must be one of: asc, desc"),
    ],
)
def test_page_request_rejects(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"limit": None, "cursor": None, **kwargs}
    with pytest.raises(InvalidParameter, match=match):
        page_request(SPEC, **args)  # type: ignore[arg-type]


def test_page_request_checks_the_cursor_against_the_effective_sort() -> None:
    cursor = encode_cursor("created_at", Order.DESC, datetime(2026, 1, 1, tzinfo=UTC), "vm_1")
    assert page_request(SPEC, limit=None, cursor=cursor).after == (datetime(2026, 1, 1, tzinfo=UTC), "vm_1")
    with pytest.raises(InvalidCursor):
        page_request(SPEC, limit=None, cursor=cursor, order="asc")
    with pytest.raises(InvalidCursor):
        page_request(SPEC, limit=None, cursor=cursor, sort="name")


def test_default_order_comes_from_the_spec() -> None:
    spec = ListSpec(default_limit=5, max_limit=10, default_order=Order.ASC)
    assert page_request(spec, limit=None, cursor=None).order is Order.ASC


@pytest.mark.parametrize(
    "payload",
    [
        [1, "created_at", "desc", ["t", "2026-01-01T00:00:00+00:00"], "\ud800"],
        [1, "created_at", "desc", ["t", "2026-01-01T00:00:00+00:00"], "sec_\u0000"],
        [1, "created_at", "desc", ["t", "2026-01-01T00:00:00+00:00"], "not an id"],
        [1, "name", "desc", ["s", "\udfff"], "sec_abc"],
        [1, "name", "desc", ["s", "a\u0000b"], "sec_abc"],
        [1, "name", "desc", ["s", "x" * 1025], "sec_abc"],
        [1, "name", "sideways", ["s", "x"], "sec_abc"],
    ],
)
def test_forged_cursor_contents_are_invalid(payload: list[object]) -> None:
    with pytest.raises(InvalidCursor, match="malformed"):
        page_request(SPEC, limit=None, cursor=_raw(payload))


def test_sort_and_order_come_from_the_cursor_when_left_out() -> None:
    cursor = encode_cursor("name", Order.ASC, "bob", "usr_1")
    got = page_request(SPEC, limit=None, cursor=cursor)
    assert got == PageRequest(limit=20, sort="name", order=Order.ASC, after=("bob", "usr_1"))
    with pytest.raises(InvalidCursor, match="sort=name"):
        page_request(SPEC, limit=None, cursor=cursor, sort="created_at")
