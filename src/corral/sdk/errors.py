"""The SDK's exceptions: one hierarchy under ``CorralError``, chosen by HTTP status and carrying the API's
``error.code``; ``error_for`` maps an error answer to its exception (pure)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping


class CorralError(Exception):
    """Base of every SDK error. ``status`` is the HTTP status (None when no answer came), ``code`` the
    API's ``error.code`` (e.g. ``vm_not_found``), ``message`` its text."""

    def __init__(self, status: int | None, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}" if status is not None else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class ConfigError(CorralError):
    """No API key (or a bad setting): raised before anything is sent."""

    def __init__(self, message: str) -> None:
        super().__init__(None, "config_error", message)


class APIConnectionError(CorralError):
    """The server could not be reached, or the connection broke, after the retries allowed."""

    def __init__(self, message: str) -> None:
        super().__init__(None, "connection_error", message)


class APIStatusError(CorralError):
    """The server answered with an error status."""

    status: int

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)


class BadRequestError(APIStatusError):
    """400: malformed JSON, a bad query parameter or cursor, a body over the limit."""


class AuthenticationError(APIStatusError):
    """401: missing or invalid API key."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404: no such resource (or not yours)."""


class ConflictError(APIStatusError):
    """409: the resource is not in a state that allows this (``vm_not_running``, ``vm_name_taken``, ...)."""


class ValidationError(APIStatusError):
    """422: the request body broke a field rule."""


class RateLimitError(APIStatusError):
    """429 after the retries allowed; ``retry_after`` is the server's ``Retry-After`` in seconds."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(status, code, message)
        self.retry_after = retry_after


class ServerError(APIStatusError):
    """5xx: the server (or the host under it) failed: ``vm_failed``, ``state_failed``, ``disk_full``, ..."""


class UnexpectedResponseError(CorralError):
    """A success answer the SDK could not read as the documented object (a server of another version?)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, "unexpected_response", message)


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: ValidationError,
}


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` as seconds (the API sends an integer; a fraction is accepted), None if absent or not a
    number of seconds."""
    raw = headers.get("retry-after") or headers.get("Retry-After")
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def error_body(content: bytes) -> tuple[str | None, str | None]:
    """``(code, message)`` of the API's ``{"error": {"code", "message"}}`` envelope, Nones if not one."""
    try:
        parsed = json.loads(content)
    except ValueError:
        return None, None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return None, None
    code, message = error.get("code"), error.get("message")
    return (code if isinstance(code, str) else None, message if isinstance(message, str) else None)


def error_for(status: int, headers: Mapping[str, str], content: bytes) -> APIStatusError:
    """The exception for an error answer: its class by status, the envelope's code and message (or the
    status and the start of the body when the answer is not the envelope, e.g. from a proxy in front)."""
    code, message = error_body(content)
    code = code or f"http_{status}"
    if message is None:
        text = content[:500].decode(errors="replace").strip()
        message = text or f"HTTP {status}"
    if status == 429:
        return RateLimitError(status, code, message, retry_after_seconds(headers))
    if status >= 500:
        return ServerError(status, code, message)
    return _BY_STATUS.get(status, APIStatusError)(status, code, message)
