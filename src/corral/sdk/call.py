"""One API request as data (``Call``), built by the functions in ``corral.sdk.endpoints`` and sent by either
client, and how an answer becomes a model. Nothing here does I/O."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

import httpx
import pydantic

from corral.sdk.errors import UnexpectedResponseError
from corral.sdk.models import Page
from corral.sdk.uploads import UploadSource

type Param = str | int | float | bool


class Unset(enum.Enum):
    """A field left out (where None means something: ``comment=None`` clears a comment)."""

    UNSET = "unset"


UNSET = Unset.UNSET
type Parser[T] = Callable[[httpx.Response], T]


@dataclass(frozen=True)
class Route:
    """An operation of the API as the server declares it: ``GET /v1/vms/{vm_id}``."""

    method: str
    template: str


@dataclass(frozen=True)
class Call[T]:
    route: Route
    parse: Parser[T]
    path_values: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Param] = field(default_factory=dict)
    json: object | None = None
    upload: UploadSource | None = None
    auth: bool = True
    stream: bool = False
    read_timeout: float | None = None  # None: the client's own timeout
    http_method: str | None = None  # for a route that takes any method (the proxy)
    raise_errors: bool = True  # False: an error status is an answer like any other (the proxy's guest)
    # sent as Idempotency-Key: the server answers a repeat with the first answer, so the call may be sent
    # again after a connection that broke once the request went out (a create is not made twice)
    idempotency_key: str | None = None

    @property
    def method(self) -> str:
        return self.http_method or self.route.method

    @property
    def path(self) -> str:
        # a value named ``path`` is the rest of a path (the proxy's): its slashes stay
        return self.route.template.format(
            **{k: quote(v, safe="/") if k == "path" else segment(v) for k, v in self.path_values.items()}
        )

    @property
    def replayable(self) -> bool:
        return self.upload is None or self.upload.replayable

    def query(self) -> dict[str, str]:
        return {k: _param(v) for k, v in self.params.items()}

    def with_params(self, **params: Param) -> Call[T]:
        return replace(self, params={**self.params, **params})


def _param(value: Param) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def params(**values: Param | None) -> dict[str, Param]:
    """Query parameters without the ones left out (None)."""
    return {k.rstrip("_"): v for k, v in values.items() if v is not None}


def body(**values: object) -> dict[str, object]:
    """A JSON body without the fields left out (None)."""
    return {k: v for k, v in values.items() if v is not None}


def segment(value: str) -> str:
    """A path parameter, escaped so that it stays one segment."""
    return quote(value, safe="")


# ---- parsers -------------------------------------------------------------------------------------------


def _checked[T](resp: httpx.Response, build: Callable[[], T]) -> T:
    try:
        return build()
    except (pydantic.ValidationError, ValueError) as exc:
        raise UnexpectedResponseError(
            resp.status_code, f"{resp.request.method} {resp.url.path}: {exc}"
        ) from exc


def model[M: pydantic.BaseModel](kind: type[M]) -> Parser[M]:
    """The answer is the object itself."""
    return lambda resp: _checked(resp, lambda: kind.model_validate_json(resp.content))


def data[M: pydantic.BaseModel](kind: type[M]) -> Parser[M]:
    """The answer is ``{"data": object}``."""

    def parse(resp: httpx.Response) -> M:
        return _checked(resp, lambda: kind.model_validate(_data_of(resp)))

    return parse


def data_list[M: pydantic.BaseModel](kind: type[M]) -> Parser[list[M]]:
    """The answer is ``{"data": [object, ...]}``."""
    adapter = pydantic.TypeAdapter(list[kind])  # type: ignore[valid-type]

    def parse(resp: httpx.Response) -> list[M]:
        items: list[M] = _checked(resp, lambda: adapter.validate_python(_data_of(resp)))
        return items

    return parse


def page[M: pydantic.BaseModel](kind: type[M]) -> Parser[Page[M]]:
    """The answer is a list envelope ``{"data", "has_more", "cursor"}``."""
    return lambda resp: _checked(resp, lambda: Page[kind].model_validate_json(resp.content))  # type: ignore[valid-type]


def _data_of(resp: httpx.Response) -> Any:
    parsed = resp.json()
    if not isinstance(parsed, dict) or "data" not in parsed:
        raise ValueError('expected an object with "data"')
    return parsed["data"]


def nothing(resp: httpx.Response) -> None:
    """204 No Content."""


def raw(resp: httpx.Response) -> httpx.Response:
    """The answer itself (streams: the client reads it)."""
    return resp


def next_page[T](call: Call[Page[T]], current: Page[T]) -> Call[Page[T]] | None:
    """The request for the page after ``current`` (the same filters, sort and order, its cursor), or None
    after the last page."""
    if not current.has_more or not current.cursor:
        return None
    return call.with_params(cursor=current.cursor)
