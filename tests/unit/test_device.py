"""Device-code login, pure part: reading the code a person types."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.domain.errors import InvalidParameter
from corral.services.device import PollResult, PollStatus, _new_code, normalise_code

_SHAPE = re.compile(r"[A-Z]{4}-[0-9]{4}")


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("ABCD-1234", "ABCD-1234"),
        ("abcd-1234", "ABCD-1234"),
        ("AbCd-1234", "ABCD-1234"),
        ("abcd1234", "ABCD-1234"),
        ("  abcd-1234\n", "ABCD-1234"),
        ("abcd 1234", "ABCD-1234"),
        ("ab cd-12 34", "ABCD-1234"),
        ("\tABCD1234 ", "ABCD-1234"),
    ],
)
def test_accepts_what_people_type(typed: str, expected: str) -> None:
    assert normalise_code(typed) == expected


@pytest.mark.parametrize(
    "typed",
    [
        "",
        "   ",
        "ABCD",
        "1234",
        "ABC-1234",
        "ABCDE-1234",
        "ABCD-123",
        "ABCD-12345",
        "1234-ABCD",
        "ABCD-12A4",
        "AB1D-1234",
        "ABCD_1234",
        "ABCD.1234",
        "ABCD\t1234",
        "ÀBCD-1234",
        "ABCD-\uff11\uff12\uff13\uff14",  # full-width digits
    ],
)
def test_rejects_anything_else(typed: str) -> None:
    with pytest.raises(InvalidParameter, match="ABCD-1234"):
        normalise_code(typed)


@given(st.text(max_size=20))
def test_output_is_always_canonical_or_invalid_parameter(typed: str) -> None:
    try:
        out = normalise_code(typed)
    except InvalidParameter:
        return
    assert _SHAPE.fullmatch(out)
    assert normalise_code(out) == out


@given(st.from_regex(_SHAPE, fullmatch=True), st.booleans(), st.booleans())
def test_every_spelling_of_a_code_normalises_to_it(code: str, lower: bool, dash: bool) -> None:
    typed = code.lower() if lower else code
    typed = typed if dash else typed.replace("-", "")
    assert normalise_code(f" {typed} ") == code


def test_new_codes_are_canonical_and_avoid_i_and_o() -> None:
    codes = {_new_code() for _ in range(500)}
    assert len(codes) > 490
    for code in codes:
        assert normalise_code(code) == code
        assert not set(code) & set("IO")


def test_poll_result_repr_hides_the_token() -> None:
    result = PollResult(PollStatus.AUTHORIZED, "corral_live_secret-token")
    assert "secret-token" not in repr(result)
    assert "authorized" in repr(result)
