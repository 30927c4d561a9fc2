"""Every operation the server has is reachable from both SDK clients: the endpoint functions each client
method calls (marked by the clients), given sample arguments, must build requests for exactly the
operations of the app's OpenAPI description (and its WebSocket routes). A new endpoint without an SDK method,
or an SDK method for an endpoint that is gone, fails here."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import WebSocketRoute

import corral
from corral.api.app import create_app
from corral.config import Settings
from corral.sdk.call import Call, Route
from corral.sdk.transport import USES

# WebSockets the SDK does not wrap yet (docs/sdk.md says so): a terminal needs a terminal at the caller's end
NOT_WRAPPED: set[str] = set()


def sample(annotation: str) -> object:
    if annotation.startswith("int"):
        return 1
    if "UploadData" in annotation:
        return b"x"
    return "x_1"


def built_route(build: Callable[..., Call[Any]]) -> Route:
    """The route ``build`` makes a request for, called with a sample for each required argument; the
    request's path must be the route's template filled in."""
    args: list[object] = []
    kwargs: dict[str, object] = {}
    for param in inspect.signature(build).parameters.values():
        if param.default is not inspect.Parameter.empty:
            continue
        value = sample(str(param.annotation))
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[param.name] = value
        else:
            args.append(value)
    call = build(*args, **kwargs)
    template = re.escape(call.route.template).replace(r"\{path\}", ".*")  # the rest of a path
    pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", template)
    assert re.fullmatch(pattern, call.path), (build.__name__, call.path, call.route)
    return call.route


def client_routes(client: object) -> dict[tuple[str, str], str]:
    """(method, template) -> the client method that covers it, over the client and its namespaces."""
    out: dict[tuple[str, str], str] = {}
    holders = [client, *(v for v in vars(client).values() if hasattr(v, "_runner"))]
    for holder in holders:
        for name, member in inspect.getmembers(type(holder), callable):
            for build in getattr(member, USES, ()):
                route = built_route(build)
                out[(route.method, route.template)] = f"{type(holder).__name__}.{name}"
    return out


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory: pytest.TempPathFactory) -> tuple[set[tuple[str, str]], set[str]]:
    data = tmp_path_factory.mktemp("coverage")
    settings = Settings.from_env({"CORRAL_DATA_DIR": str(data), "CORRAL_NODE": "off", "CORRAL_SSH": "off"})
    app = create_app(settings)
    ops = {(m.upper(), p) for p, item in app.openapi()["paths"].items() for m in item}
    return ops, websocket_paths(app.routes)


def websocket_paths(routes: list[Any]) -> set[str]:
    """WebSocket routes, also inside included routers (FastAPI keeps them as ``original_router``)."""
    out: set[str] = set()
    for route in routes:
        if isinstance(route, WebSocketRoute):
            out.add(route.path.replace(":path}", "}"))
        elif hasattr(route, "original_router"):
            out |= websocket_paths(route.original_router.routes)
    return out


@pytest.mark.parametrize("kind", ["Client", "AsyncClient"])
def test_the_sdk_covers_every_operation(
    kind: str, app_routes: tuple[set[tuple[str, str]], set[str]], tmp_path: Path
) -> None:
    ops, sockets = app_routes
    client = getattr(corral, kind)("ck_x", "http://corral.test")
    covered = client_routes(client)
    missing = ops - covered.keys()
    assert not missing, f"operations without an SDK method in {kind}: {sorted(missing)}"
    stale = {(m, t) for (m, t) in covered if t not in sockets} - ops
    assert not stale, f"SDK methods for operations the server does not have: {sorted(stale)}"
    # the proxy's WebSocket is on its HTTP path: proxy_url(..., websocket=True) is its URL
    assert sockets - {t for (_, t) in covered} == NOT_WRAPPED, "WebSocket routes changed: wrap or list them"


def test_both_clients_have_the_same_surface() -> None:
    def surface(client: object) -> dict[str, set[str]]:
        spaces = {k: v for k, v in vars(client).items() if hasattr(v, "_runner")}
        out = {k: {n for n in dir(v) if not n.startswith("_")} for k, v in spaces.items()}
        out[""] = {n for n in dir(type(client)) if not n.startswith("_")} - {"close", "aclose"}
        return out

    assert surface(corral.Client("k", "http://x")) == surface(corral.AsyncClient("k", "http://x"))
