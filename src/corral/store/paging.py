"""Keyset pagination over a SELECT: the I/O half of ``corral.domain.pagination``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from corral.domain.errors import InvalidCursor
from corral.domain.pagination import Order, Page, PageRequest, SortKey, encode_cursor

T = TypeVar("T")
R = TypeVar("R")


def paginate[T, R](
    session: Session,
    stmt: Select[T],
    *,
    request: PageRequest,
    sort_columns: Mapping[str, tuple[ColumnElement[Any] | InstrumentedAttribute[Any], type]],
    id_column: InstrumentedAttribute[str],
    sort_value: Callable[[T, str], SortKey],
    render: Callable[[T], R],
) -> Page[R]:
    """One page of ``stmt`` ordered by ``(sort column, id)``, starting after ``request.after``.

    ``sort_value(row, sort)`` must return exactly the value the sort column holds for the row (NULLs are
    mapped to a non-NULL value by the column expression, e.g. ``coalesce``).
    """
    col, key_type = sort_columns[request.sort]
    asc = request.order is Order.ASC
    if request.after is not None:
        key, ident = request.after
        if type(key) is not key_type:
            raise InvalidCursor("cursor is malformed")
        if asc:
            stmt = stmt.where(or_(col > key, and_(col == key, id_column > ident)))
        else:
            stmt = stmt.where(or_(col < key, and_(col == key, id_column < ident)))
    ordering = (col.asc(), id_column.asc()) if asc else (col.desc(), id_column.desc())
    rows = list(session.scalars(stmt.order_by(*ordering).limit(request.limit + 1)))
    has_more = len(rows) > request.limit
    rows = rows[: request.limit]
    cursor = None
    if has_more:
        last = rows[-1]
        cursor = encode_cursor(request.sort, request.order, sort_value(last, request.sort), _ident(last))
    return Page(data=[render(r) for r in rows], has_more=has_more, cursor=cursor)


def _ident(row: object) -> str:
    ident = getattr(row, "id", None)
    if not isinstance(ident, str):
        raise TypeError("paginated rows need a string id")
    return ident
