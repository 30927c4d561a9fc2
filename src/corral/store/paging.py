"""Keyset pagination over a SELECT: the I/O half of ``corral.domain.pagination``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from corral.domain.errors import InvalidCursor
from corral.domain.pagination import Order, Page, PageRequest, encode_cursor

SortColumns = Mapping[str, tuple[ColumnElement[Any] | InstrumentedAttribute[Any], type]]
"""Sort field -> (SQL expression, Python type of its values). NULLs must be mapped away (``coalesce``)."""


def paginate[T, R](
    session: Session,
    stmt: Select[T],
    *,
    request: PageRequest,
    sort_columns: SortColumns,
    id_column: InstrumentedAttribute[str],
    render: Callable[[T], R],
) -> Page[R]:
    """One page of ``stmt`` (a SELECT of one entity) ordered by ``(sort expression, id)``, starting after
    ``request.after``. The next cursor's key is read back from the database with the row, so it is exactly
    what the keyset comparison of the next page will compare against."""
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
    keyed = stmt.add_columns(col.label("page_key"), id_column.label("page_id"))
    rows = session.execute(keyed.order_by(*ordering).limit(request.limit + 1)).all()
    has_more = len(rows) > request.limit
    rows = rows[: request.limit]
    cursor = None
    if has_more:
        _, last_key, last_id = rows[-1]
        cursor = encode_cursor(request.sort, request.order, last_key, last_id)
    return Page(data=[render(row[0]) for row in rows], has_more=has_more, cursor=cursor)
