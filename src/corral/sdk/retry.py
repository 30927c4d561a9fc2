"""When to send a request again (pure): a 429 after its ``Retry-After``, whatever the method; a connection
that could not be made, whatever the method (nothing reached the server); a connection that broke after the
request went out only for idempotent methods (a POST may have taken effect)."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from corral.sdk.errors import retry_after_seconds

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
DEFAULT_RETRY_AFTER = 1.0  # a 429 without a usable Retry-After
MAX_RETRY_AFTER = 120.0
BACKOFF = 0.25  # first wait after a connection error, doubled each time
MAX_BACKOFF = 4.0


def after_status(
    status: int, headers: Mapping[str, str], attempt: int, max_retries: int, replayable: bool = True
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1`` after an error answer, or None: do not retry."""
    if status != 429 or attempt >= max_retries or not replayable:
        return None
    wait = retry_after_seconds(headers)
    return min(DEFAULT_RETRY_AFTER if wait is None else wait, MAX_RETRY_AFTER)


def after_error(
    method: str,
    exc: httpx.TransportError,
    attempt: int,
    max_retries: int,
    replayable: bool = True,
    *,
    idempotent: bool = False,
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1`` after a transport error, or None: do not retry.
    ``idempotent``: the request carries an Idempotency-Key, so a POST may be sent again as well."""
    if attempt >= max_retries or not replayable:
        return None
    never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    if not never_sent and method.upper() not in IDEMPOTENT and not idempotent:
        return None
    if not isinstance(exc, httpx.NetworkError | httpx.TimeoutException | httpx.RemoteProtocolError):
        return None  # e.g. an unsupported protocol or a bad URL: the same again would fail the same way
    return min(BACKOFF * 2.0**attempt, MAX_BACKOFF)
