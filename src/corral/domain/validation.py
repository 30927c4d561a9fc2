"""Field rules shared by the API schemas and the services. Each returns the normalised value or raises
``ValueError`` with a message fit for a ``validation_error`` response."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re

ENV_KEY_MAX = 256
ENV_VALUE_MAX = 32 * 1024
SECRET_NAME_MAX = 64
SECRET_VALUE_MAX = 64 * 1024
COMMENT_MAX = 1024
HOSTS_MAX = 100
NAME_MAX = 100

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_VAR = re.compile(r"[A-Z][A-Z0-9_]*")
_SECRET_NAME = re.compile(r"[A-Za-z0-9_-]+")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def env_key(key: str) -> str:
    """A POSIX-shell-safe environment variable name."""
    if not key or len(key) > ENV_KEY_MAX or not _ENV_KEY.fullmatch(key):
        raise ValueError(
            "key must start with a letter or underscore and contain only letters, digits and underscores "
            f"(at most {ENV_KEY_MAX} characters)"
        )
    return key


def is_storable(text: str) -> bool:
    """Text every database can store and every encoder can send: no lone surrogates (JSON can carry them),
    no NUL (PostgreSQL text cannot hold it)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def unicode_text(value: str, field: str) -> str:
    """Text that can be stored and sent on: JSON can carry lone surrogates, which no encoder accepts."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{field} must be valid Unicode text (no lone surrogates)") from None
    return value


def env_value(value: str) -> str:
    unicode_text(value, "value")
    if "\x00" in value:
        raise ValueError("value must not contain NUL characters")
    if len(value) > ENV_VALUE_MAX:
        raise ValueError(f"value must be at most {ENV_VALUE_MAX} characters")
    return value


def secret_env_var(name: str) -> str:
    if not _ENV_VAR.fullmatch(name) or len(name) > ENV_KEY_MAX:
        raise ValueError(
            "env_var must be uppercase letters, digits and underscores, starting with a letter "
            f"(at most {ENV_KEY_MAX} characters)"
        )
    return name


def secret_name(name: str) -> str:
    if not name or len(name) > SECRET_NAME_MAX or not _SECRET_NAME.fullmatch(name):
        raise ValueError(
            f"name must be 1 to {SECRET_NAME_MAX} characters of letters, digits, hyphens and underscores"
        )
    return name


def secret_value(value: str) -> str:
    unicode_text(value, "secret")
    if not value:
        raise ValueError("secret must not be empty")
    if len(value) > SECRET_VALUE_MAX:
        raise ValueError(f"secret must be at most {SECRET_VALUE_MAX} characters")
    return value


def rule_name(name: str) -> str:
    """A human-readable name: 1 to 100 printable characters, not blank."""
    if not name.strip() or len(name) > NAME_MAX or not name.isprintable():
        raise ValueError(f"name must be 1 to {NAME_MAX} printable characters, not blank")
    return name


def comment(text: str) -> str:
    if len(text) > COMMENT_MAX:
        raise ValueError(f"comment must be at most {COMMENT_MAX} characters")
    return text


def hostname(host: str) -> str:
    """An exact DNS hostname, lower-cased. IP literals are not hostnames (use a CIDR)."""
    name = host.lower()
    if len(name) > 253 or "." not in name:
        raise ValueError(f"{host!r} is not a fully qualified hostname")
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{host!r} is not a valid hostname")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):  # 127.1, 0x7f.0x1: what inet_aton reads as an address
        raise ValueError(f"{host!r} looks like an IP address: use a cidr rule")
    return name


def host_pattern(pattern: str, *, allow_any: bool) -> str:
    """An exact hostname, a single-level wildcard ``*.example.org``, or (where allowed) ``*``."""
    if pattern == "*":
        if allow_any:
            return pattern
        raise ValueError("'*' is not allowed here: use mode 'warn' or a cidr rule to allow everything")
    if pattern.startswith("*."):
        return "*." + hostname(pattern[2:])
    if "*" in pattern:
        raise ValueError(
            f"{pattern!r}: a wildcard is only allowed as the whole first label ('*.example.org')"
        )
    return hostname(pattern)


def secret_hosts(hosts: list[str]) -> list[str]:
    if not hosts:
        raise ValueError('hosts must not be empty (use ["*"] for any host)')
    if len(hosts) > HOSTS_MAX:
        raise ValueError(f"hosts must have at most {HOSTS_MAX} entries")
    out: list[str] = []
    for entry in hosts:
        norm = host_pattern(entry, allow_any=True)
        if norm not in out:
            out.append(norm)
    return out


def cidr(text: str) -> str:
    """A network in CIDR notation, with no host bits set; returned in canonical form."""
    if "%" in text:
        raise ValueError(f"{text!r}: scoped addresses (with %zone) are not networks")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid CIDR network ({exc})") from None
    return str(net)


def email(address: str) -> str:
    norm = address.strip().lower()
    if len(norm) > 254 or not _EMAIL.fullmatch(norm):
        raise ValueError("email must be a valid email address")
    return norm


def person_name(text: str, field: str) -> str:
    norm = text.strip()
    if not norm or len(norm) > NAME_MAX:
        raise ValueError(f"{field} must be 1 to {NAME_MAX} characters")
    return norm


def password(text: str) -> str:
    if len(text) < 8 or len(text) > 1024:
        raise ValueError("password must be 8 to 1024 characters")
    return text


_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def vm_name(name: str) -> str:
    if not _VM_NAME.fullmatch(name):
        raise ValueError(
            "name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def ssh_public_key(text: str) -> str:
    """An OpenSSH public key line (``type base64 [comment]``) whose blob names the same key type."""
    if any(not (c.isprintable() or c == "\t") for c in text.strip()):
        raise ValueError("public_key must be one line of printable text (one OpenSSH public key)")
    parts = re.split(r"[ \t]+", text.strip(), maxsplit=2)
    if len(text) > 16384 or len(parts) < 2 or parts[0] not in _SSH_KEY_TYPES:
        raise ValueError(
            "public_key must be an OpenSSH public key such as 'ssh-ed25519 AAAAC3Nza... comment'"
        )
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("public_key's key data is not valid base64") from None
    if len(blob) < 4:
        raise ValueError("public_key's key data is too short")
    length = int.from_bytes(blob[:4], "big")
    if blob[4 : 4 + length] != parts[0].encode():
        raise ValueError("public_key's key data does not match its type")
    return " ".join(parts)
