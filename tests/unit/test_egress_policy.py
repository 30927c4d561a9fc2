"""Egress policy evaluation (pure): host patterns, the policy's verdicts in enforce and warn mode, CIDR rules,
a VM's effective policy, Host header parsing and the addresses no sandbox may reach."""

from __future__ import annotations

import ipaddress

import pytest

from corral.domain.egress_policy import (
    ENFORCE,
    WARN,
    Decision,
    Forbidden,
    Policy,
    Rule,
    effective,
    host_matches,
    is_ip_literal,
    normalise_host,
    split_host_port,
)

# --- host_matches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        # exact
        ("example.org", "example.org", True),
        ("example.org", "EXAMPLE.Org", True),
        ("example.org", "example.org.", True),
        ("example.org", "  example.org  ", True),
        ("example.org", "www.example.org", False),
        ("example.org", "example.org.evil.net", False),
        ("example.org", "xexample.org", False),
        ("example.org", "example.com", False),
        ("example.org", "", False),
        # one label, exactly
        ("*.example.org", "api.example.org", True),
        ("*.example.org", "API.Example.ORG.", True),
        ("*.example.org", "a-b.example.org", True),
        ("*.example.org", "example.org", False),
        ("*.example.org", "a.b.example.org", False),
        ("*.example.org", ".example.org", False),
        ("*.example.org", "api.example.org.evil.net", False),
        ("*.example.org", "apiexample.org", False),
        ("*.example.org", "api.example.com", False),
        # anything that is a name
        ("*", "example.org", True),
        ("*", "localhost", True),
        ("*", "", False),
        ("*", ".", False),
        ("*", "   ", False),
    ],
)
def test_host_matches(pattern: str, name: str, expected: bool) -> None:
    assert host_matches(pattern, name) is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("Example.ORG", "example.org"), ("example.org.", "example.org"), (" a.b \n", "a.b"), ("", "")],
)
def test_normalise_host(raw: str, expected: str) -> None:
    assert normalise_host(raw) == expected


# --- Policy ---------------------------------------------------------------------------------------------

RULES = [
    Rule(host="api.example.org"),
    Rule(host="*.github.com"),
    Rule(host="Mixed.Case.ORG."),
    Rule(cidr="10.1.0.0/16"),
    Rule(cidr="192.0.2.7"),  # a single address
    Rule(cidr="2001:db8::/32"),
]


def test_build_sorts_rules_into_exact_wildcard_and_networks() -> None:
    policy = Policy.build(ENFORCE, RULES)
    assert policy.exact == {"api.example.org", "mixed.case.org"}
    assert policy.wildcards == {"github.com"}
    assert policy.networks == (
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )


def test_build_takes_a_rule_with_both_host_and_cidr_as_both() -> None:
    policy = Policy.build(ENFORCE, [Rule(host="a.example.org", cidr="198.51.100.0/24")])
    assert policy.allows_host("a.example.org")
    assert policy.allows_address("198.51.100.9")


def test_build_accepts_a_cidr_with_host_bits() -> None:
    assert Policy.build(ENFORCE, [Rule(cidr="10.1.2.3/16")]).allows_address("10.1.200.200")


def test_a_star_host_rule_allows_nothing() -> None:
    """``*`` is no egress rule (the API refuses it: warn mode is how everything is allowed)."""
    policy = Policy.build(ENFORCE, [Rule(host="*")])
    assert not policy.exact
    assert not policy.wildcards
    assert not policy.allows_host("example.org")


@pytest.mark.parametrize("mode", ["", "allow", "ENFORCE", "off"])
def test_build_refuses_an_unknown_mode(mode: str) -> None:
    with pytest.raises(ValueError, match="unknown egress mode"):
        Policy.build(mode, [])


@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "not-a-network", "2001:db8::/129"])
def test_build_refuses_a_bad_cidr(cidr: str) -> None:
    with pytest.raises(ValueError, match="does not appear to be"):
        Policy.build(ENFORCE, [Rule(cidr=cidr)])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("api.example.org", True),
        ("API.EXAMPLE.ORG.", True),
        ("mixed.case.org", True),
        ("www.api.example.org", False),
        ("example.org", False),
        ("github.com", False),
        ("gist.github.com", True),
        ("a.gist.github.com", False),
        ("github.com.evil.net", False),
        ("", False),
        (".", False),
        (".github.com", False),
    ],
)
def test_allows_host(name: str, expected: bool) -> None:
    assert Policy.build(ENFORCE, RULES).allows_host(name) is expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.1.0.0", True),
        ("10.1.255.255", True),
        ("10.2.0.1", False),
        ("192.0.2.7", True),
        ("192.0.2.8", False),
        ("2001:db8::1", True),
        ("2001:DB8:ffff::1", True),
        ("2001:db9::1", False),
        ("::ffff:10.1.0.1", False),  # an IPv4-mapped address is IPv6: no IPv4 rule covers it
        ("garbage", False),
        ("", False),
        ("10.1.0.1/32", False),
        ("api.example.org", False),
    ],
)
def test_allows_address(address: str, expected: bool) -> None:
    assert Policy.build(ENFORCE, RULES).allows_address(address) is expected


@pytest.mark.parametrize(
    ("host", "address", "verdict"),
    [
        ("api.example.org", None, "allowed"),
        (None, "10.1.2.3", "allowed"),
        ("api.example.org", "8.8.8.8", "allowed"),  # the name matches
        ("evil.net", "10.1.2.3", "allowed"),  # the address matches
        ("evil.net", None, "denied"),
        (None, "8.8.8.8", "denied"),
        ("evil.net", "8.8.8.8", "denied"),
        (None, None, "denied"),
        ("", "", "denied"),
    ],
)
@pytest.mark.parametrize("mode", [ENFORCE, WARN])
def test_decide(mode: str, host: str | None, address: str | None, verdict: str) -> None:
    decision = Policy.build(mode, RULES).decide(host=host, address=address)
    # warn mode lets everything through, and still says whether a rule matched
    assert decision == Decision(verdict, verdict == "allowed" or mode == WARN, mode)  # type: ignore[arg-type]


def test_an_empty_policy_denies_everything_in_enforce_mode_and_nothing_in_warn_mode() -> None:
    assert Policy.build(ENFORCE, []).decide(host="example.org", address="1.1.1.1") == Decision(
        "denied", False, ENFORCE
    )
    assert Policy.build(WARN, []).decide(host="example.org") == Decision("denied", True, WARN)


# --- effective ------------------------------------------------------------------------------------------

ACCOUNT = [Rule(host="api.example.org")]
OWN = [Rule(host="*.pypi.org"), Rule(cidr="203.0.113.0/24")]


@pytest.mark.parametrize(
    ("account_mode", "vm_mode", "expected"),
    [
        (ENFORCE, None, ENFORCE),
        (WARN, None, WARN),
        (ENFORCE, WARN, WARN),
        (WARN, ENFORCE, ENFORCE),
        (ENFORCE, "", ENFORCE),  # an empty override is no override
    ],
)
def test_effective_mode_is_the_vms_own_else_the_accounts(
    account_mode: str, vm_mode: str | None, expected: str
) -> None:
    assert effective(account_mode, ACCOUNT, vm_mode, OWN).mode == expected


def test_effective_rules_are_the_accounts_plus_the_vms() -> None:
    policy = effective(ENFORCE, ACCOUNT, None, OWN)
    assert policy.allows_host("api.example.org")
    assert policy.allows_host("files.pypi.org")
    assert policy.allows_address("203.0.113.9")
    assert not policy.allows_host("evil.net")


def test_effective_with_no_vm_rules_is_the_account_policy() -> None:
    assert effective(WARN, ACCOUNT, None, []) == Policy.build(WARN, ACCOUNT)


def test_effective_refuses_an_unknown_vm_mode() -> None:
    with pytest.raises(ValueError, match="unknown egress mode"):
        effective(ENFORCE, ACCOUNT, "sometimes", OWN)


# --- Host headers and IP literals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("example.org", "example.org"),
        ("Example.ORG", "example.org"),
        ("example.org:8443", "example.org"),
        ("Example.Org.:80", "example.org"),
        ("example.org:", "example.org"),
        ("  example.org:80  ", "example.org"),
        ("192.0.2.1:8080", "192.0.2.1"),
        ("192.0.2.1", "192.0.2.1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),  # unbracketed IPv6 is left whole
        ("[2001:db8::1", "[2001:db8::1"),  # no closing bracket: left as it is
        ("", ""),
    ],
)
def test_split_host_port(value: str, host: str) -> None:
    assert split_host_port(value) == host


def test_split_host_port_lower_cases_a_bracketed_ipv6_host() -> None:
    assert split_host_port("[2001:DB8::A]:443") == "2001:db8::a"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", True),
        ("2001:db8::1", True),
        ("[2001:db8::1]", True),
        ("::ffff:1.2.3.4", True),
        ("example.org", False),
        ("192.0.2.1:80", False),
        ("256.0.0.1", False),
        ("1.2.3", False),
        ("", False),
        ("[]", False),
    ],
)
def test_is_ip_literal(text: str, expected: bool) -> None:
    assert is_ip_literal(text) is expected


# --- Forbidden ------------------------------------------------------------------------------------------

PLATFORM = Forbidden.of("10.88.0.0/16", "100.127.88.0/30")


@pytest.mark.parametrize(
    "address",
    [
        "10.88.0.1",  # another sandbox
        "10.88.255.255",
        "100.127.88.1",  # the uplink
        "100.127.88.2",
        "127.0.0.1",  # loopback
        "127.255.255.254",
        "0.0.0.0",  # noqa: S104 -- an address to refuse, nothing binds
        "0.1.2.3",
        "169.254.1.1",  # the gateway
        "169.254.169.254",  # cloud metadata
        "224.0.0.1",  # multicast
        "239.255.255.250",
        "240.0.0.1",  # reserved
        "255.255.255.255",
        # no IPv6 at all, whatever the address
        "::1",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "fe80::1",
        # what is no address is refused
        "garbage",
        "",
        "10.88.0.1/32",
        "example.org",
        "1.2.3",
    ],
)
def test_forbidden(address: str) -> None:
    assert address in PLATFORM


@pytest.mark.parametrize("address", ["8.8.8.8", "10.87.255.255", "10.89.0.0", "100.127.88.4", "192.168.1.1"])
def test_not_forbidden(address: str) -> None:
    assert address not in PLATFORM


def test_forbidden_takes_address_objects() -> None:
    assert ipaddress.ip_address("10.88.1.1") in PLATFORM
    assert ipaddress.ip_address("8.8.8.8") not in PLATFORM
    assert ipaddress.ip_address("2001:db8::1") in PLATFORM


def test_forbidden_without_extra_ranges_has_only_the_base() -> None:
    base = Forbidden.of()
    assert "10.88.0.1" not in base
    assert "127.0.0.1" in base
    assert len(base.networks) == 5
