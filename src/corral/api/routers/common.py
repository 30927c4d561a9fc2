"""What every router shares: documented error responses and list query parameters."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query
from pydantic import BaseModel

from corral.api.schemas import ErrorEnvelope, ListEnvelope
from corral.domain.pagination import Page

_DESCRIPTIONS = {
    400: "Bad request: malformed JSON, a bad query parameter or cursor, or a body over the size limit",
    401: "Missing or invalid API key",
    404: "Resource not found (or not yours)",
    409: "Conflict",
    422: "Validation error",
    403: "Forbidden: the caller may not use this endpoint (`forbidden`)",
    429: "Rate limited; see the Retry-After header",
    500: "The host could not capture or restore the sandbox (`state_failed`); the VM is left as it was",
    503: "The node is full (`node_full`: the message says what is short) or runs no sandboxes "
    "(`node_unavailable`), or a transient failure (`temporarily_unavailable`: retry after Retry-After)",
    408: "The request body stopped arriving (`request_timeout`); nothing was kept",
    507: "The VM's disk is full (`disk_full`); no partial file is left",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorEnvelope, "description": _DESCRIPTIONS[status]}
        if status in (429, 503):
            entry["headers"] = {
                "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
            }
        out[status] = entry
    return out


AUTHED = (400, 401, 429)  # every authenticated endpoint; those with a body add 422

Cursor = Annotated[str | None, Query(description="Pagination cursor from the previous response")]
Limit = Annotated[int | None, Query(description="Results per page")]
SortOrder = Annotated[str | None, Query(description="Sort order: asc, desc")]


def envelope[M: BaseModel](page: Page[Any], model: type[M]) -> ListEnvelope[M]:
    """A page of rows (or views) as the list envelope of ``model``."""
    return ListEnvelope[M](
        data=[model.model_validate(row) for row in page.data], has_more=page.has_more, cursor=page.cursor
    )
