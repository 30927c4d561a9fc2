"""Egress policy evaluation: which destinations a sandbox may reach. Pure: no I/O.

A destination is a hostname (from TLS SNI, the HTTP Host header, or the name the sandbox resolved through
Corral's DNS), an address, or both. Host rules match names (exact, or ``*.example.org``: exactly one more
label); CIDR rules match addresses. In ``enforce`` mode only matching destinations are allowed; in ``warn``
mode everything is allowed and the verdict says whether a rule matched. Addresses of the platform itself are
never reachable, whatever the mode."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["allowed", "denied"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ENFORCE = "enforce"
WARN = "warn"


def normalise_host(name: str) -> str:
    return name.strip().lower().rstrip(".")


def host_matches(pattern: str, name: str) -> bool:
    """``pattern`` is ``*`` (anything), ``*.example.org`` (one label before ``example.org``) or exact."""
    name = normalise_host(name)
    if pattern == "*":
        return bool(name)
    if pattern.startswith("*."):
        label, _, rest = name.partition(".")
        return bool(label) and rest == pattern[2:]
    return name == pattern


@dataclass(frozen=True)
class Rule:
    host: str | None = None
    cidr: str | None = None


@dataclass(frozen=True)
class Decision:
    verdict: Verdict  # did a rule allow it
    allowed: bool  # is it let through (warn mode lets denied destinations through)
    mode: str


@dataclass(frozen=True)
class Policy:
    mode: str
    exact: frozenset[str]
    wildcards: frozenset[str]  # the parent domain of each ``*.`` rule
    networks: tuple[IPNetwork, ...]

    @classmethod
    def build(cls, mode: str, rules: Iterable[Rule]) -> Policy:
        if mode not in (ENFORCE, WARN):
            raise ValueError(f"unknown egress mode {mode!r}")
        exact: set[str] = set()
        wild: set[str] = set()
        nets: list[IPNetwork] = []
        for rule in rules:
            if rule.host:
                host = normalise_host(rule.host)
                if host.startswith("*."):
                    wild.add(host[2:])
                elif host != "*":
                    exact.add(host)
            if rule.cidr:
                nets.append(ipaddress.ip_network(rule.cidr, strict=False))
        return cls(mode, frozenset(exact), frozenset(wild), tuple(nets))

    def allows_host(self, name: str) -> bool:
        name = normalise_host(name)
        if not name:
            return False
        if name in self.exact:
            return True
        label, _, parent = name.partition(".")
        return bool(label) and parent in self.wildcards

    def allows_address(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip.version == net.version and ip in net for net in self.networks)

    def decide(self, host: str | None = None, address: str | None = None) -> Decision:
        """A destination is allowed by a rule when its name matches a host rule or its address a CIDR rule."""
        matched = bool(host and self.allows_host(host)) or bool(address and self.allows_address(address))
        return Decision("allowed" if matched else "denied", matched or self.mode == WARN, self.mode)


def effective(
    account_mode: str, account_rules: Iterable[Rule], vm_mode: str | None, vm_rules: Iterable[Rule]
) -> Policy:
    """A VM's policy: its own mode when it has one, else the account's; the account's rules plus its own."""
    return Policy.build(vm_mode or account_mode, [*account_rules, *vm_rules])


def is_ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def split_host_port(value: str) -> str:
    """The host of a Host header value (``name``, ``name:port``, ``[v6]:port``), lower-cased."""
    value = value.strip()
    if value.startswith("["):
        return (value[1 : value.find("]")] if "]" in value else value).lower()
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return normalise_host(value)


@dataclass(frozen=True)
class Forbidden:
    """Addresses no sandbox may reach in any mode: the platform's own (sandboxes, gateway, uplink, host)."""

    networks: tuple[IPNetwork, ...]

    @classmethod
    def of(cls, *cidrs: str) -> Forbidden:
        base = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in (*base, *cidrs)))

    def __contains__(self, address: object) -> bool:
        try:
            ip = ipaddress.ip_address(str(address))
        except ValueError:
            return True
        if ip.version != 4:
            return True  # no IPv6 leaves the gateway
        return any(ip.version == net.version and ip in net for net in self.networks)
