"""One error tree for the whole API, each class with a stable ``code`` and HTTP status.

Third-party errors are translated into these at the boundary; ``corral.api.errors`` maps them to HTTP in
exactly one place.
"""

from __future__ import annotations


class CorralError(Exception):
    """Base of every error the API reports. ``code`` is stable and machine-readable."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(CorralError):
    status = 400
    code = "bad_request"


class InvalidParameter(BadRequest):
    code = "invalid_parameter"


class InvalidCursor(BadRequest):
    code = "invalid_cursor"


class Unauthorized(CorralError):
    status = 401
    code = "unauthorized"


class NotFound(CorralError):
    status = 404
    code = "not_found"


class Conflict(CorralError):
    status = 409
    code = "conflict"


class ValidationFailed(CorralError):
    status = 422
    code = "validation_error"


class RateLimited(CorralError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TemporarilyUnavailable(CorralError):
    """503 with ``Retry-After``: a transient failure (the same request may succeed in a moment)."""

    status = 503
    code = "temporarily_unavailable"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def not_found(resource: str, ident: str, *, label: str | None = None) -> NotFound:
    """``vm_not_found`` / "No VM with ID vm_x", the reference's shape for a missing resource."""
    return NotFound(f"No {label or resource.replace('_', ' ')} with ID {ident}", code=f"{resource}_not_found")
