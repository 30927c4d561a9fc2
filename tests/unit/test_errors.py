"""The error tree: a stable code and status per class."""

from __future__ import annotations

import pytest

from corral.domain.errors import (
    BadRequest,
    Conflict,
    CorralError,
    InvalidCursor,
    InvalidParameter,
    NotFound,
    RateLimited,
    Unauthorized,
    ValidationFailed,
    not_found,
)


@pytest.mark.parametrize(
    ("cls", "status", "code"),
    [
        (CorralError, 500, "internal_error"),
        (BadRequest, 400, "bad_request"),
        (InvalidParameter, 400, "invalid_parameter"),
        (InvalidCursor, 400, "invalid_cursor"),
        (Unauthorized, 401, "unauthorized"),
        (NotFound, 404, "not_found"),
        (Conflict, 409, "conflict"),
        (ValidationFailed, 422, "validation_error"),
    ],
)
def test_status_and_code(cls: type[CorralError], status: int, code: str) -> None:
    exc = cls("boom")
    assert (exc.status, exc.code, exc.message, str(exc)) == (status, code, "boom", "boom")
    assert isinstance(exc, CorralError)


@pytest.mark.parametrize("cls", [InvalidParameter, InvalidCursor])
def test_parameter_errors_are_bad_requests(cls: type[CorralError]) -> None:
    assert issubclass(cls, BadRequest)


def test_code_override_is_per_instance() -> None:
    exc = Conflict("taken", code="name_taken")
    assert exc.code == "name_taken"
    assert Conflict("other").code == "conflict"
    assert Conflict.code == "conflict"


def test_rate_limited_carries_retry_after() -> None:
    exc = RateLimited("slow down", retry_after=7)
    assert (exc.status, exc.code, exc.retry_after, exc.message) == (429, "rate_limited", 7, "slow down")


@pytest.mark.parametrize(
    ("resource", "label", "code", "message"),
    [
        ("vm", None, "vm_not_found", "No vm with ID vm_x"),
        ("vm", "VM", "vm_not_found", "No VM with ID vm_x"),
        ("egress_rule", None, "egress_rule_not_found", "No egress rule with ID vm_x"),
    ],
)
def test_not_found(resource: str, label: str | None, code: str, message: str) -> None:
    exc = not_found(resource, "vm_x", label=label)
    assert isinstance(exc, NotFound)
    assert (exc.status, exc.code, exc.message) == (404, code, message)
