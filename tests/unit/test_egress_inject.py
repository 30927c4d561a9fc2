"""Secret injection (pure): placeholders in outbound header values replaced by the secret's value, for the
hosts the secret is scoped to, including inside HTTP Basic credentials; a value never shows in a repr."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from corral.egress.inject import Injector, SecretEntry
from corral.services.secrets import proxy_value


def secret(name: str, value: str, *hosts: str) -> SecretEntry:
    return SecretEntry(name, proxy_value(name), value, hosts or ("*",))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


OPENAI = secret("openai", "sk-live-openai", "api.openai.com")
GITHUB = secret("gh", "ghp_github", "*.github.com", "github.com")
SHORT = secret("a", "value-a")
LONG = secret("ab", "value-ab")
ALL = (OPENAI, GITHUB, SHORT, LONG)


def test_placeholder_is_the_proxy_value() -> None:
    assert OPENAI.placeholder == "CORRAL_PROXY_openai"


# --- replacement in header values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value", "expected"),
    [
        ("Authorization", "Bearer CORRAL_PROXY_openai", "Bearer sk-live-openai"),
        ("authorization", "bearer CORRAL_PROXY_openai", "bearer sk-live-openai"),
        ("X-Api-Key", "CORRAL_PROXY_openai", "sk-live-openai"),
        ("Cookie", "a=1; token=CORRAL_PROXY_openai; b=2", "a=1; token=sk-live-openai; b=2"),
        ("X-Two", "CORRAL_PROXY_openai,CORRAL_PROXY_openai", "sk-live-openai,sk-live-openai"),
        ("X-Quoted", '"CORRAL_PROXY_openai"', '"sk-live-openai"'),
        ("X-Dot", "CORRAL_PROXY_openai.", "sk-live-openai."),
        ("X-Case", "corral_proxy_openai", "corral_proxy_openai"),  # placeholders are case-sensitive
        ("X-None", "nothing to see", "nothing to see"),
        ("X-Empty", "", ""),
    ],
)
def test_replaced_in_any_header(header: str, value: str, expected: str) -> None:
    fields, used = Injector.for_host(ALL, "api.openai.com").headers([(header, value)])
    assert fields == [(header, expected)]
    assert used == ({"openai"} if expected != value else set())


def test_headers_keep_order_names_and_duplicates() -> None:
    given = [
        ("Host", "api.openai.com"),
        ("Authorization", "Bearer CORRAL_PROXY_openai"),
        ("X-Dup", "1"),
        ("X-Dup", "CORRAL_PROXY_a"),
    ]
    fields, used = Injector.for_host(ALL, "api.openai.com").headers(given)
    assert fields == [
        ("Host", "api.openai.com"),
        ("Authorization", "Bearer sk-live-openai"),
        ("X-Dup", "1"),
        ("X-Dup", "value-a"),
    ]
    assert used == {"openai", "a"}


def test_a_value_is_put_in_literally() -> None:
    """Replacement text is not a regex template: backslashes and group references stay as they are."""
    odd = secret("odd", r"\1\g<0>$&\n")
    fields, used = Injector.for_host([odd], "x.example.org").headers([("K", "v=CORRAL_PROXY_odd")])
    assert fields == [("K", r"v=\1\g<0>$&\n")]
    assert used == {"odd"}


def test_a_value_holding_a_placeholder_is_not_replaced_again() -> None:
    outer = secret("outer", "CORRAL_PROXY_inner")
    inner = secret("inner", "INNER")
    fields, used = Injector.for_host([outer, inner], "x.example.org").headers([("K", "CORRAL_PROXY_outer")])
    assert fields == [("K", "CORRAL_PROXY_inner")]
    assert used == {"outer"}


# --- longest placeholder first, no prefix confusion -------------------------------------------------------


@pytest.mark.parametrize(
    ("secrets", "value", "expected", "used"),
    [
        ((SHORT, LONG), "CORRAL_PROXY_ab", "value-ab", {"ab"}),
        ((LONG, SHORT), "CORRAL_PROXY_ab", "value-ab", {"ab"}),
        ((SHORT, LONG), "CORRAL_PROXY_a", "value-a", {"a"}),
        ((SHORT, LONG), "CORRAL_PROXY_a CORRAL_PROXY_ab", "value-a value-ab", {"a", "ab"}),
        ((SHORT, LONG), "CORRAL_PROXY_a:CORRAL_PROXY_ab", "value-a:value-ab", {"a", "ab"}),
        # only the short one applies: the longer placeholder is not the short one plus letters
        ((SHORT,), "CORRAL_PROXY_ab", "CORRAL_PROXY_ab", set()),
        ((SHORT,), "CORRAL_PROXY_aZ", "CORRAL_PROXY_aZ", set()),
        ((SHORT,), "CORRAL_PROXY_a9", "CORRAL_PROXY_a9", set()),
        ((SHORT,), "CORRAL_PROXY_a_x", "CORRAL_PROXY_a_x", set()),
        ((SHORT,), "CORRAL_PROXY_a-x", "CORRAL_PROXY_a-x", set()),
        ((SHORT,), "CORRAL_PROXY_a/x", "value-a/x", {"a"}),
        ((SHORT,), "CORRAL_PROXY_", "CORRAL_PROXY_", set()),
        ((LONG,), "CORRAL_PROXY_a", "CORRAL_PROXY_a", set()),
    ],
)
def test_longest_placeholder_first_and_no_run_on(
    secrets: tuple[SecretEntry, ...], value: str, expected: str, used: set[str]
) -> None:
    fields, got = Injector.for_host(secrets, "x.example.org").headers([("K", value)])
    assert fields == [("K", expected)]
    assert got == used


# --- HTTP Basic credentials ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Basic", "basic", "BASIC"])
def test_basic_credentials_are_decoded_replaced_and_encoded_again(scheme: str) -> None:
    value = f"{scheme} {b64('user:CORRAL_PROXY_gh')}"
    fields, used = Injector.for_host(ALL, "api.github.com").headers([("Authorization", value)])
    assert fields == [("Authorization", f"{scheme} {b64('user:ghp_github')}")]
    assert used == {"gh"}


def test_basic_credentials_with_the_placeholder_as_user_and_padding_spaces() -> None:
    value = f"Basic   {b64('CORRAL_PROXY_gh:x-oauth-basic')}  "
    fields, _ = Injector.for_host(ALL, "github.com").headers([("Authorization", value)])
    assert fields == [("Authorization", f"Basic {b64('ghp_github:x-oauth-basic')}")]


def test_basic_credentials_with_a_non_ascii_value() -> None:
    uni = secret("uni", "pässwörd")
    value = f"Basic {b64('me:CORRAL_PROXY_uni')}"
    fields, _ = Injector.for_host([uni], "x.example.org").headers([("Authorization", value)])
    assert base64.b64decode(fields[0][1].split()[1]).decode() == "me:pässwörd"


@pytest.mark.parametrize(
    "value",
    [
        f"Basic {b64('user:password')}",  # base64 without a placeholder: untouched, byte for byte
        f"Basic   {b64('user:password')}",
        "Basic !!!not-base64!!!",
        "Basic dXNlcjpwYXNz=",  # bad padding
        "Basic " + base64.b64encode(b"\xff\xfe:\x80").decode(),  # not UTF-8
        "Basic",
        "Basic ",
    ],
)
def test_basic_credentials_left_alone(value: str) -> None:
    fields, used = Injector.for_host(ALL, "api.github.com").headers([("Authorization", value)])
    assert fields == [("Authorization", value)]
    assert used == set()


def test_a_plain_placeholder_after_basic_is_still_replaced() -> None:
    """Not base64 (the underscore): the header value is treated as text."""
    fields, used = Injector.for_host(ALL, "github.com").headers([("Authorization", "Basic CORRAL_PROXY_gh")])
    assert fields == [("Authorization", "Basic ghp_github")]
    assert used == {"gh"}


def test_basic_is_only_a_scheme_at_the_start() -> None:
    value = f"Token Basic {b64('u:CORRAL_PROXY_gh')}"
    fields, _ = Injector.for_host(ALL, "github.com").headers([("Authorization", value)])
    assert fields == [("Authorization", value)]


# --- host scoping ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "names"),
    [
        ("api.openai.com", {"openai", "a", "ab"}),
        ("API.OpenAI.com.", {"openai", "a", "ab"}),
        ("openai.com", {"a", "ab"}),
        ("x.api.openai.com", {"a", "ab"}),
        ("github.com", {"gh", "a", "ab"}),
        ("api.github.com", {"gh", "a", "ab"}),
        ("a.b.github.com", {"a", "ab"}),
        ("evil.net", {"a", "ab"}),
    ],
)
def test_secrets_apply_only_to_their_hosts(host: str, names: set[str]) -> None:
    injector = Injector.for_host(ALL, host)
    assert {s.name for s in injector.secrets} == names
    value = "CORRAL_PROXY_openai CORRAL_PROXY_gh CORRAL_PROXY_a CORRAL_PROXY_ab"
    _, used = injector.headers([("K", value)])
    assert used == names


def test_a_secret_for_another_host_passes_unchanged() -> None:
    fields, used = Injector.for_host(ALL, "evil.net").headers(
        [("Authorization", "Bearer CORRAL_PROXY_openai")]
    )
    assert fields == [("Authorization", "Bearer CORRAL_PROXY_openai")]
    assert used == set()


def test_no_secret_for_the_host_makes_an_empty_injector() -> None:
    injector = Injector.for_host([OPENAI], "evil.net")
    assert not injector
    assert injector.pattern is None
    assert injector.header_value("CORRAL_PROXY_openai", set()) == "CORRAL_PROXY_openai"
    assert injector.headers([("K", "CORRAL_PROXY_openai")]) == ([("K", "CORRAL_PROXY_openai")], set())
    assert Injector.for_host([], "api.openai.com").pattern is None
    assert Injector.for_host([OPENAI], "api.openai.com")


@pytest.mark.parametrize(
    ("hosts", "host", "expected"),
    [
        (("api.openai.com",), "api.openai.com", True),
        (("api.openai.com",), "Api.OpenAI.Com.", True),
        (("api.openai.com",), "openai.com", False),
        (("*.openai.com",), "api.openai.com", True),
        (("*.openai.com",), "openai.com", False),
        (("*.openai.com",), "a.b.openai.com", False),
        (("*",), "anything.example", True),
        (("*",), "", False),
        (("x.org", "*.y.org"), "z.y.org", True),
        ((), "api.openai.com", False),
    ],
)
def test_applies_to(hosts: tuple[str, ...], host: str, expected: bool) -> None:
    assert SecretEntry("n", "CORRAL_PROXY_n", "v", hosts).applies_to(host) is expected


# --- never shown -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "render", [repr, str, lambda e: f"{e}", lambda e: f"{e!r}", lambda e: repr([e, (e,)])]
)
def test_repr_never_shows_the_value(render: Callable[[SecretEntry], str]) -> None:
    text = render(OPENAI)
    assert "sk-live-openai" not in text
    assert "openai" in text
    assert "api.openai.com" in text


def test_injector_repr_never_shows_a_value() -> None:
    text = repr(Injector.for_host(ALL, "api.openai.com"))
    for value in ("sk-live-openai", "value-a", "value-ab"):
        assert value not in text
