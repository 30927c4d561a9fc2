"""The one place errors become HTTP: describe_validation as a table, the handlers on a bare app."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, SecretStr

from corral.api.errors import describe_validation, install
from corral.domain.errors import Conflict, CorralError, NotFound, RateLimited, ValidationFailed

SECRET = "sk-live-do-not-echo"


def _err(loc: tuple[Any, ...], kind: str, msg: str, value: object = SECRET) -> dict[str, Any]:
    return {"loc": loc, "type": kind, "msg": msg, "input": value, "ctx": {"given": value}}


@pytest.mark.parametrize(
    ("errors", "expected"),
    [
        (
            [_err(("body", 5), "json_invalid", "JSON decode error")],
            (400, "invalid_json", "Request body is not valid JSON"),
        ),
        (
            [_err(("query", "limit"), "int_parsing", "Input should be a valid integer")],
            (400, "invalid_parameter", "limit: Input should be a valid integer"),
        ),
        (
            [_err(("path", "vm_id"), "string_too_long", "String should have at most 64 characters")],
            (400, "invalid_parameter", "vm_id: String should have at most 64 characters"),
        ),
        (
            [_err(("header", "x-request-id"), "missing", "Field required")],
            (400, "invalid_parameter", "x-request-id: Field required"),
        ),
        (
            [
                _err(("query", "limit"), "int_parsing", "bad limit"),
                _err(("query", "order"), "enum", "bad order"),
            ],
            (400, "invalid_parameter", "limit: bad limit; order: bad order"),
        ),
        (
            [_err(("body",), "missing", "Field required", None)],
            (422, "validation_error", "Request body is required (a JSON object)"),
        ),
        (
            [_err(("body", "name"), "missing", "Field required")],
            (422, "validation_error", "name: Field required"),
        ),
        (
            [_err(("body", "hosts", 2), "value_error", "Value error, bad host")],
            (422, "validation_error", "hosts.2: Value error, bad host"),
        ),
        (
            [_err(("body",), "model_attributes_type", "Input should be a valid dictionary")],
            (422, "validation_error", "body: Input should be a valid dictionary"),
        ),
        (
            [_err((), "value_error", "whole thing")],
            (422, "validation_error", "body: whole thing"),
        ),
        (
            [{"loc": ("body", "x")}],
            (422, "validation_error", "x: invalid"),
        ),
        (
            [_err(("body", f"f{i}"), "missing", "Field required") for i in range(8)],
            (
                422,
                "validation_error",
                "f0: Field required; f1: Field required; f2: Field required; f3: Field required; "
                "f4: Field required",
            ),
        ),
    ],
)
def test_describe_validation(errors: list[dict[str, Any]], expected: tuple[int, str, str]) -> None:
    assert describe_validation(errors) == expected
    assert SECRET not in describe_validation(errors)[2]


def test_describe_validation_of_nothing_is_still_a_validation_error() -> None:
    status, code, _ = describe_validation([])
    assert (status, code) == (422, "validation_error")


# --- the handlers, on a bare app without a server --------------------------------------------------------


class _Body(BaseModel):
    name: str
    secret: SecretStr
    count: int = 0


def _app() -> FastAPI:
    app = FastAPI()
    install(app)

    @app.get("/raise/{kind}")
    def raise_(kind: str) -> None:
        errors: dict[str, CorralError] = {
            "conflict": Conflict("Name taken", code="name_taken"),
            "missing": NotFound("No VM with ID vm_x", code="vm_not_found"),
            "invalid": ValidationFailed("bad"),
            "slow": RateLimited("Too many requests", retry_after=7),
        }
        if kind in errors:
            raise errors[kind]
        raise RuntimeError(f"internal detail {SECRET}")

    @app.post("/items")
    def create(body: _Body, limit: int = 10) -> dict[str, int]:
        return {"limit": limit, "count": body.count}

    return app


def _request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "code"),
    [
        ("GET", "/raise/conflict", {}, 409, "name_taken"),
        ("GET", "/raise/missing", {}, 404, "vm_not_found"),
        ("GET", "/raise/invalid", {}, 422, "validation_error"),
        ("GET", "/raise/slow", {}, 429, "rate_limited"),
        ("GET", "/raise/boom", {}, 500, "internal_error"),
        ("GET", "/nowhere", {}, 404, "not_found"),
        ("DELETE", "/items", {}, 405, "method_not_allowed"),
        (
            "POST",
            "/items",
            {"content": b"{nope", "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
        ),
        ("POST", "/items", {}, 422, "validation_error"),
        ("POST", "/items", {"json": {"name": "x"}}, 422, "validation_error"),
        ("POST", "/items?limit=many", {"json": {"name": "x", "secret": "s"}}, 400, "invalid_parameter"),
        ("POST", "/items", {"json": {"name": "x", "secret": "s", "count": 3}}, 200, None),
    ],
)
def test_handlers(method: str, url: str, kwargs: dict[str, Any], status: int, code: str | None) -> None:
    response = _request(method, url, **kwargs)
    assert response.status_code == status, response.text
    if code is not None:
        body = response.json()
        assert set(body) == {"error"}
        assert body["error"]["code"] == code
        assert isinstance(body["error"]["message"], str)
        assert body["error"]["message"]


def test_rate_limited_sets_retry_after() -> None:
    response = _request("GET", "/raise/slow")
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"]["message"] == "Too many requests"


def test_unknown_route_message() -> None:
    assert _request("GET", "/nowhere").json()["error"]["message"] == "No such endpoint"


def test_unexpected_errors_do_not_leak(caplog: pytest.LogCaptureFixture) -> None:
    response = _request("GET", "/raise/boom")
    assert response.json() == {"error": {"code": "internal_error", "message": "Internal server error"}}
    assert SECRET not in response.text
    assert "unhandled error on GET /raise/boom" in caplog.text


@pytest.mark.parametrize(
    "payload",
    [
        {"name": 5, "secret": SECRET},  # another field is wrong
        {"name": "x", "secret": [SECRET]},  # the secret itself is the wrong type
        {"name": "x", "secret": SECRET, "count": SECRET},
    ],
)
def test_validation_errors_never_echo_the_input(payload: dict[str, Any]) -> None:
    response = _request("POST", "/items", json=payload)
    assert response.status_code == 422
    assert SECRET not in response.text
