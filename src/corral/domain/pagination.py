"""Cursor pagination, pure part.

A cursor is opaque to clients. It carries the sort field, the order and the (sort key, id) of the last row
of the page, so the next page is a keyset query (``(key, id) > (last_key, last_id)``): it stays correct when
rows are inserted or deleted between pages (no row is skipped or repeated), and it does not need the last row
to still exist.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TypeVar

from corral.domain.errors import InvalidCursor, InvalidParameter
from corral.domain.validation import is_storable

T = TypeVar("T")
SortKey = str | int | datetime

_VERSION = 1


class Order(StrEnum):
    ASC = "asc"
    DESC = "desc"


@dataclass(frozen=True)
class PageRequest:
    limit: int
    sort: str
    order: Order
    after: tuple[SortKey, str] | None = None  # (sort key, id) of the last row already seen


@dataclass(frozen=True)
class Page[T]:
    data: list[T]
    has_more: bool
    cursor: str | None


@dataclass(frozen=True)
class ListSpec:
    """What a list endpoint documents: its default and maximum ``limit`` and its sort fields."""

    default_limit: int
    max_limit: int
    sorts: tuple[str, ...] = ("created_at",)
    default_order: Order = Order.DESC


def _encode_key(key: SortKey) -> list[str | int]:
    if isinstance(key, datetime):
        return ["t", key.isoformat()]
    if isinstance(key, int):
        return ["i", key]
    return ["s", key]


def _decode_key(raw: object) -> SortKey:
    match raw:
        case ["t", str(text)]:
            try:
                stamp = datetime.fromisoformat(text)
                if stamp.tzinfo is None:
                    raise InvalidCursor("cursor is malformed")
                return stamp.astimezone(UTC)
            except (ValueError, OverflowError):
                raise InvalidCursor("cursor is malformed") from None
        case ["i", int(num)] if not isinstance(num, bool):
            return num
        case ["s", str(text)]:
            return text
    raise InvalidCursor("cursor is malformed")


def encode_cursor(sort: str, order: Order, key: SortKey, ident: str) -> str:
    payload = json.dumps([_VERSION, sort, order.value, _encode_key(key), ident], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


_IDENT = re.compile(r"[a-z]+_[0-9a-z]{1,64}")
_KEY_TEXT_MAX = 1024


@dataclass(frozen=True)
class Cursor:
    sort: str
    order: Order
    key: SortKey
    ident: str


def parse_cursor(cursor: str) -> Cursor:
    """Everything a cursor says, checked: a forged one is an ``InvalidCursor``, never a database error."""
    if len(cursor) > 2048:
        raise InvalidCursor("cursor is malformed")
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidCursor("cursor is malformed") from None
    match raw:
        case [int(version), str(sort), "asc" | "desc" as order, key, str(ident)] if (
            version == _VERSION and not isinstance(version, bool) and _IDENT.fullmatch(ident)
        ):
            value = _decode_key(key)
            if isinstance(value, str) and not (is_storable(value) and len(value) <= _KEY_TEXT_MAX):
                raise InvalidCursor("cursor is malformed")
            return Cursor(sort=sort, order=Order(order), key=value, ident=ident)
    raise InvalidCursor("cursor is malformed")


def decode_cursor(cursor: str, sort: str, order: Order) -> tuple[SortKey, str]:
    parsed = parse_cursor(cursor)
    _check_matches(parsed, sort, order)
    return parsed.key, parsed.ident


def _check_matches(parsed: Cursor, sort: str, order: Order) -> None:
    if parsed.sort != sort or parsed.order is not order:
        raise InvalidCursor(
            f"cursor was issued for sort={parsed.sort}&order={parsed.order.value}; "
            f"pass the same sort and order as the first page, or leave them out"
        )


def page_request(
    spec: ListSpec,
    *,
    limit: int | None,
    cursor: str | None,
    sort: str | None = None,
    order: str | None = None,
) -> PageRequest:
    """Validate the documented query parameters of a list endpoint into a PageRequest. With a cursor, a
    ``sort`` or ``order`` left out is the one the cursor was issued for."""
    size = spec.default_limit if limit is None else limit
    if not 1 <= size <= spec.max_limit:
        raise InvalidParameter(f"limit must be between 1 and {spec.max_limit}")
    parsed = parse_cursor(cursor) if cursor is not None else None
    field = sort if sort is not None else (parsed.sort if parsed else spec.sorts[0])
    if sort is None and parsed is not None and field not in spec.sorts:
        raise InvalidCursor("cursor was not issued by this list")
    if field not in spec.sorts:
        raise InvalidParameter(f"sort must be one of: {', '.join(spec.sorts)}")
    try:
        direction = Order(order) if order is not None else (parsed.order if parsed else spec.default_order)
    except ValueError:
        raise InvalidParameter("order must be one of: asc, desc") from None
    if parsed is None:
        return PageRequest(limit=size, sort=field, order=direction)
    _check_matches(parsed, field, direction)
    return PageRequest(limit=size, sort=field, order=direction, after=(parsed.key, parsed.ident))
