"""Field rules: each returns the normalised value or raises ValueError."""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.domain import validation as v

# --- hostnames and host patterns --------------------------------------------------------------------

_GOOD_HOSTS = [
    ("example.com", "example.com"),
    ("api.example.com", "api.example.com"),
    ("API.Example.COM", "api.example.com"),
    ("a.b", "a.b"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("my-host.example.org", "my-host.example.org"),
    ("123.example.com", "123.example.com"),
    ("a1.b2", "a1.b2"),
    ("a" * 63 + ".com", "a" * 63 + ".com"),
    (".".join(["a" * 63] * 3) + "." + "b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61),  # 253
]

_BAD_HOSTS = [
    "",
    "localhost",  # not fully qualified
    "com",
    "example.com.",  # trailing dot
    ".example.com",
    "a..b",
    "a.b..",
    "-a.com",
    "a-.com",
    "a_b.com",
    "a b.com",
    "a.b\n",
    "ex@mple.com",
    "a" * 64 + ".com",  # label too long
    ".".join(["a" * 63] * 3) + "." + "b" * 62,  # 254 characters
    "1.2.3.4",  # IP literals: use a cidr rule
    "10.0.0.1",
    "127.1",
    "::1",
    "[::1]",
    "fe80::1",
    "2001:db8::1",
    "bücher.example",  # must be given as its IDNA (xn--) form
    "*.example.com",  # hostname() never takes a wildcard
    "example.com:443",
    "http://example.com",
    "example.com/path",
]


@pytest.mark.parametrize(("host", "expected"), _GOOD_HOSTS)
def test_hostname_accepts(host: str, expected: str) -> None:
    assert v.hostname(host) == expected


@pytest.mark.parametrize("host", _BAD_HOSTS)
def test_hostname_rejects(host: str) -> None:
    with pytest.raises(ValueError, match=r"hostname|IP address"):
        v.hostname(host)


@pytest.mark.parametrize("host", ["1.2.3.4", "192.168.0.1", "1.2.3.04"])
def test_ip_literal_message_points_at_cidr_rules(host: str) -> None:
    with pytest.raises(ValueError, match="use a cidr rule"):
        v.hostname(host)


@pytest.mark.parametrize("host", ["0x7f.0x1", "1.2.3.0x4"])
def test_hostname_rejects_ip_literals_in_inet_aton_forms(host: str) -> None:
    # getaddrinfo()/inet_aton() read these as IPv4 addresses (0x7f.0x1 is 127.0.0.1), so a "hostname"
    # rule would allow an address without a cidr rule.
    with pytest.raises(ValueError, match=r"hostname|IP address"):
        v.hostname(host)


@pytest.mark.parametrize(
    ("pattern", "allow_any", "expected"),
    [
        ("example.com", False, "example.com"),
        ("Example.COM", False, "example.com"),
        ("*.example.com", False, "*.example.com"),
        ("*.EXAMPLE.com", False, "*.example.com"),
        ("*.a.b.example.com", False, "*.a.b.example.com"),
        ("*", True, "*"),
        ("*.example.com", True, "*.example.com"),
    ],
)
def test_host_pattern_accepts(pattern: str, allow_any: bool, expected: str) -> None:
    assert v.host_pattern(pattern, allow_any=allow_any) == expected


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        ("*", "'\\*' is not allowed here"),
        ("*.*.x.com", "not a valid hostname"),
        ("*.x.*.com", "not a valid hostname"),
        ("foo*.x.com", "wildcard is only allowed as the whole first label"),
        ("*foo.x.com", "wildcard is only allowed as the whole first label"),
        ("f*o.x.com", "wildcard is only allowed as the whole first label"),
        ("x.com.*", "wildcard is only allowed as the whole first label"),
        ("**.x.com", "wildcard is only allowed as the whole first label"),
        ("*x.com", "wildcard is only allowed as the whole first label"),
        ("*.", "not a fully qualified hostname"),
        ("*.com", "not a fully qualified hostname"),  # a wildcard over a whole TLD
        ("*.x.com.", "not a valid hostname"),
        ("*..x.com", "not a valid hostname"),
        ("*.1.2.3.4", "use a cidr rule"),
        ("a..b", "not a valid hostname"),
        ("1.2.3.4", "use a cidr rule"),
        ("::1", "not a fully qualified hostname"),
        ("", "not a fully qualified hostname"),
        (" ", "not a fully qualified hostname"),
    ],
)
def test_host_pattern_rejects(pattern: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        v.host_pattern(pattern, allow_any=False)


@pytest.mark.parametrize("pattern", ["*.*.x.com", "foo*.x.com", "a..b", "1.2.3.4", "**"])
def test_allow_any_only_admits_the_bare_star(pattern: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (the message is tested above)
        v.host_pattern(pattern, allow_any=True)


_label = st.from_regex(re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?"), fullmatch=True)
_tld = st.from_regex(re.compile(r"[a-zA-Z][a-zA-Z0-9]{1,10}"), fullmatch=True)
_names = st.builds(
    lambda labels, tld: ".".join([*labels, tld]), st.lists(_label, min_size=1, max_size=4), _tld
)


@given(_names)
def test_valid_names_normalise_to_lower_case_and_are_idempotent(name: str) -> None:
    norm = v.hostname(name)
    assert norm == name.lower()
    assert v.hostname(norm) == norm
    assert v.host_pattern("*." + name, allow_any=False) == "*." + norm


_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@settings(max_examples=300)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.text(string.printable, max_size=40))
def test_host_pattern_output_is_always_a_clean_name(text: str) -> None:
    try:
        out = v.host_pattern(text, allow_any=True)
    except ValueError:
        return
    if out == "*":
        return
    name = out.removeprefix("*.")
    assert name.isascii()
    assert len(name) <= 253
    labels = name.split(".")
    assert len(labels) >= 2
    assert all(_LABEL_RE.fullmatch(label) for label in labels)
    assert not labels[-1].isdigit()


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        (["*"], ["*"]),
        (["api.example.com"], ["api.example.com"]),
        (["A.example.com", "a.example.com", "*.example.com"], ["a.example.com", "*.example.com"]),
        (["b.com", "a.com", "b.com"], ["b.com", "a.com"]),  # order kept, duplicates dropped
    ],
)
def test_secret_hosts(hosts: list[str], expected: list[str]) -> None:
    assert v.secret_hosts(hosts) == expected


@pytest.mark.parametrize(
    ("hosts", "match"),
    [
        ([], "must not be empty"),
        ([f"h{i}.example.com" for i in range(101)], "at most 100"),
        (["ok.com", "foo*.x.com"], "wildcard"),
        (["ok.com", "1.2.3.4"], "cidr"),
    ],
)
def test_secret_hosts_rejects(hosts: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        v.secret_hosts(hosts)


def test_secret_hosts_allows_exactly_the_maximum() -> None:
    hosts = [f"h{i}.example.com" for i in range(v.HOSTS_MAX)]
    assert v.secret_hosts(hosts) == hosts


# --- CIDR -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.168.1.0/24", "192.168.1.0/24"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("1.2.3.4/32", "1.2.3.4/32"),
        ("1.2.3.4", "1.2.3.4/32"),  # a single address is a /32
        ("10.0.0.0/255.0.0.0", "10.0.0.0/8"),  # netmask form, canonicalised
        ("::/0", "::/0"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("2001:0db8:0000::/48", "2001:db8::/48"),
        ("::1", "::1/128"),
    ],
)
def test_cidr_accepts_and_canonicalises(text: str, expected: str) -> None:
    assert v.cidr(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.1/8",  # host bits set
        "192.168.1.1/24",
        "2001:db8::1/32",
        "10.0.0.0/33",
        "::/129",
        "10.0.0.0/-1",
        "010.0.0.0/8",  # leading zeros are ambiguous (octal?)
        "10/8",
        "10.0.0/24",
        " 10.0.0.0/8",
        "10.0.0.0/8 ",
        "example.com",
        "",
        "/8",
        "10.0.0.0/",
        "256.0.0.0/8",
    ],
)
def test_cidr_is_strict(text: str) -> None:
    with pytest.raises(ValueError, match="is not a valid CIDR network"):
        v.cidr(text)


@settings(max_examples=50)
@given(st.ip_addresses(), st.data())
def test_cidr_round_trips_any_network(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address, data: st.DataObject
) -> None:
    prefix = data.draw(st.integers(min_value=0, max_value=addr.max_prefixlen))
    net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    assert v.cidr(str(net)) == str(net)
    assert v.cidr(v.cidr(str(net))) == str(net)
    if net.network_address != addr:
        with pytest.raises(ValueError, match="not a valid CIDR"):
            v.cidr(f"{addr}/{prefix}")


# --- environment keys and values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["A", "a", "_", "_x", "PATH", "my_var_2", "X" * v.ENV_KEY_MAX, "camelCase", "__double"]
)
def test_env_key_accepts(key: str) -> None:
    assert v.env_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "1A",
        "A-B",
        "A B",
        "A=B",
        "A.B",
        "$A",
        "X" * (v.ENV_KEY_MAX + 1),
        "É",
        "A\n",
        "\nA",
        "A\x00",
    ],
)
def test_env_key_rejects(key: str) -> None:
    with pytest.raises(ValueError, match="key must start with a letter or underscore"):
        v.env_key(key)


@given(st.text(max_size=300))
def test_env_key_accepts_exactly_shell_names(key: str) -> None:
    ok = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,255}", key) is not None
    try:
        assert v.env_key(key) == key
        assert ok
    except ValueError:
        assert not ok


@pytest.mark.parametrize("value", ["", "x", "a b\tc\nd", "é" * 10, "x" * v.ENV_VALUE_MAX])
def test_env_value_accepts(value: str) -> None:
    assert v.env_value(value) == value


@pytest.mark.parametrize(
    ("value", "match"),
    [("a\x00b", "NUL"), ("\x00", "NUL"), ("x" * (v.ENV_VALUE_MAX + 1), "at most 32768")],
)
def test_env_value_rejects(value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        v.env_value(value)


# --- secrets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "A", "A1", "A_", "X" * v.ENV_KEY_MAX])
def test_secret_env_var_accepts(name: str) -> None:
    assert v.secret_env_var(name) == name


@pytest.mark.parametrize(
    "name", ["", "_A", "1A", "a", "Openai_Key", "A-B", "A B", "X" * (v.ENV_KEY_MAX + 1), "É", "A\n"]
)
def test_secret_env_var_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="env_var must be uppercase"):
        v.secret_env_var(name)


@pytest.mark.parametrize("name", ["openai", "OpenAI-key", "a_b-c", "0", "-", "_", "x" * v.SECRET_NAME_MAX])
def test_secret_name_accepts(name: str) -> None:
    assert v.secret_name(name) == name


@pytest.mark.parametrize("name", ["", "a b", "a.b", "a/b", "é", "x" * (v.SECRET_NAME_MAX + 1), "a\n"])
def test_secret_name_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="name must be 1 to 64 characters"):
        v.secret_name(name)


@pytest.mark.parametrize("value", ["x", "sk-" + "a" * 100, "x" * v.SECRET_VALUE_MAX, " "])
def test_secret_value_accepts(value: str) -> None:
    assert v.secret_value(value) == value


@pytest.mark.parametrize(
    ("value", "match"), [("", "must not be empty"), ("x" * (v.SECRET_VALUE_MAX + 1), "at most 65536")]
)
def test_secret_value_rejects(value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        v.secret_value(value)


def _message(rule: Callable[[str], str], value: str) -> str:
    try:
        rule(value)
    except ValueError as exc:
        return str(exc)
    return ""


@given(st.text(max_size=20).map(lambda s: f"Zq{s}Qz"))
def test_secret_messages_never_echo_the_value(value: str) -> None:
    for rule in (v.secret_value, v.secret_name, v.secret_env_var):
        assert value not in _message(rule, value)


# --- other fields ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "A", "0", "allow-github", "rule.v2_x", "x" * v.NAME_MAX])
def test_rule_name_accepts(name: str) -> None:
    assert v.rule_name(name) == name


@pytest.mark.parametrize("name", ["", "   ", "x" * (v.NAME_MAX + 1), "a\n", "a\x00b", "tab\there"])
def test_rule_name_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="name must be 1 to 100 printable characters"):
        v.rule_name(name)


@pytest.mark.parametrize("name", ["GitHub API", "a/b", "-a", "internal network (10/8)", "x" * v.NAME_MAX])
def test_rule_names_are_human_readable(name: str) -> None:
    assert v.rule_name(name) == name


def test_comment_length() -> None:
    assert v.comment("") == ""
    assert v.comment("x" * v.COMMENT_MAX) == "x" * v.COMMENT_MAX
    with pytest.raises(ValueError, match="at most 1024"):
        v.comment("x" * (v.COMMENT_MAX + 1))


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        ("  Alice@Example.COM ", "alice@example.com"),
        ("a+tag@sub.example.org", "a+tag@sub.example.org"),
    ],
)
def test_email_accepts(address: str, expected: str) -> None:
    assert v.email(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        "",
        "alice",
        "alice@",
        "@example.com",
        "alice@example",
        "a b@example.com",
        "a@b@c.com",
        "a@" + "x" * 250 + ".com",
    ],
)
def test_email_rejects(address: str) -> None:
    with pytest.raises(ValueError, match="valid email"):
        v.email(address)


@pytest.mark.parametrize(("text", "expected"), [("Ada", "Ada"), ("  Ada  ", "Ada"), ("x" * 100, "x" * 100)])
def test_person_name_accepts(text: str, expected: str) -> None:
    assert v.person_name(text, "first_name") == expected


@pytest.mark.parametrize("text", ["", "   ", "x" * 101])
def test_person_name_rejects_and_names_the_field(text: str) -> None:
    with pytest.raises(ValueError, match=r"^last_name must be 1 to 100 characters$"):
        v.person_name(text, "last_name")


@pytest.mark.parametrize(
    ("text", "ok"), [("1234567", False), ("12345678", True), ("x" * 1024, True), ("x" * 1025, False)]
)
def test_password_length(text: str, ok: bool) -> None:
    if ok:
        assert v.password(text) == text
    else:
        with pytest.raises(ValueError, match="8 to 1024"):
            v.password(text)


@pytest.mark.parametrize("rule", [v.secret_value, v.env_value])
def test_text_that_cannot_be_utf8_encoded_is_rejected(rule: Callable[[str], str]) -> None:
    # FastAPI parses bodies with json.loads, which turns "\\ud800" into a lone surrogate; pydantic lets it
    # through. Such a secret then fails in the cipher (str.encode) as a 500 instead of a 422.
    with pytest.raises(ValueError):  # noqa: PT011 (any message fit for a validation_error)
        rule("abc\ud800def")
