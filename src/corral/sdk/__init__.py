"""The Python SDK: ``Client`` and ``AsyncClient`` for the Corral API, typed models and the exceptions they
raise. See docs/sdk.md."""

from corral.sdk.async_client import AsyncClient, AsyncExecStream
from corral.sdk.errors import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ConflictError,
    CorralError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    UnexpectedResponseError,
    ValidationError,
)
from corral.sdk.models import ExecEvent, ExecExit, ExecOutput
from corral.sdk.sync_client import Client, ExecStream
from corral.sdk.waiting import WaitError

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "AsyncClient",
    "AsyncExecStream",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConfigError",
    "ConflictError",
    "CorralError",
    "ExecEvent",
    "ExecExit",
    "ExecOutput",
    "ExecStream",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "UnexpectedResponseError",
    "ValidationError",
    "WaitError",
]
