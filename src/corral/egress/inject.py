"""Secret injection: placeholders in outbound headers replaced by the real values. Pure: no I/O.

A sandbox's environment holds ``proxy_value`` placeholders (``CORRAL_PROXY_<name>``), never a secret. The
proxy, on an intercepted HTTPS request to a host a secret is scoped to, replaces the placeholder wherever it
appears in a header value, including inside HTTP Basic credentials (decoded, replaced, encoded again).
Elsewhere the placeholder passes unchanged and means nothing to the receiver."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from corral.domain.egress_policy import host_matches


@dataclass(frozen=True)
class SecretEntry:
    name: str
    placeholder: str
    value: str
    hosts: tuple[str, ...]

    def applies_to(self, host: str) -> bool:
        return any(host_matches(pattern, host) for pattern in self.hosts)

    def __repr__(self) -> str:  # never print the value
        return f"SecretEntry(name={self.name!r}, hosts={self.hosts!r})"


@dataclass(frozen=True)
class Injector:
    """The secrets that apply to one destination, compiled once."""

    secrets: tuple[SecretEntry, ...]
    pattern: re.Pattern[str] | None

    @classmethod
    def for_host(cls, secrets: Iterable[SecretEntry], host: str) -> Injector:
        chosen = tuple(s for s in secrets if s.applies_to(host))
        if not chosen:
            return cls((), None)
        # longest first, and a placeholder must not run on into a longer name (CORRAL_PROXY_a vs _ab)
        alternatives = "|".join(
            re.escape(s.placeholder) for s in sorted(chosen, key=lambda s: -len(s.placeholder))
        )
        return cls(chosen, re.compile(f"(?:{alternatives})(?![A-Za-z0-9_-])"))

    def __bool__(self) -> bool:
        return self.pattern is not None

    def _replace(self, text: str, used: set[str]) -> str:
        assert self.pattern is not None
        values = {s.placeholder: s for s in self.secrets}

        def sub(match: re.Match[str]) -> str:
            entry = values[match.group(0)]
            used.add(entry.name)
            return entry.value

        return self.pattern.sub(sub, text)

    def header_value(self, value: str, used: set[str]) -> str:
        if self.pattern is None:
            return value
        scheme, sep, rest = value.partition(" ")
        if sep and scheme.lower() == "basic":
            token = rest.strip()
            try:
                decoded = base64.b64decode(token, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                decoded = None
            if decoded is not None:
                replaced = self._replace(decoded, used)
                if replaced != decoded:
                    return f"{scheme} {base64.b64encode(replaced.encode()).decode()}"
        return self._replace(value, used)

    def headers(self, fields: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], set[str]]:
        """The header fields with placeholders replaced, and the names of the secrets that were used."""
        used: set[str] = set()
        out = [(name, self.header_value(value, used)) for name, value in fields]
        return out, used
