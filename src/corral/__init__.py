"""Corral: self-hosted sandboxes for AI agents and untrusted code.

``corral.Client`` / ``corral.AsyncClient`` are the Python SDK (``corral.sdk``), imported on first use so that
``import corral`` (the CLI, the server) stays cheap."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from corral.sdk import (
        APIConnectionError,
        APIStatusError,
        AsyncClient,
        AuthenticationError,
        BadRequestError,
        Client,
        ConfigError,
        ConflictError,
        CorralError,
        NotFoundError,
        PermissionDeniedError,
        RateLimitError,
        ServerError,
        UnexpectedResponseError,
        ValidationError,
        WaitError,
    )

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConfigError",
    "ConflictError",
    "CorralError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "UnexpectedResponseError",
    "ValidationError",
    "WaitError",
]
_SDK = frozenset(__all__)


def __getattr__(name: str) -> Any:
    if name in _SDK:
        return getattr(importlib.import_module("corral.sdk"), name)
    raise AttributeError(f"module 'corral' has no attribute {name!r}")
