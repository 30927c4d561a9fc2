"""What both clients share about the HTTP exchange itself: headers, timeouts, and the mark that ties a client
method to the endpoint functions it uses (the coverage test reads it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from corral import __version__
from corral.sdk.call import Call
from corral.sdk.config import Config
from corral.sdk.endpoints import vms

DEFAULT_TIMEOUT = 60.0
USER_AGENT = f"corral-python/{__version__}"
USES = "__corral_uses__"


def client_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    return (
        timeout
        if isinstance(timeout, httpx.Timeout)
        else httpx.Timeout(timeout, connect=min(timeout or 10.0, 10.0))
    )


def call_timeout(base: httpx.Timeout, call: Call[Any]) -> httpx.Timeout:
    """The client's timeout, with a longer read timeout for a call that waits on a command."""
    if call.read_timeout is None or base.read is None or base.read >= call.read_timeout:
        return base
    return httpx.Timeout(connect=base.connect, read=call.read_timeout, write=base.write, pool=base.pool)


def uses[F: Callable[..., Any]](*builders: Callable[..., Call[Any]]) -> Callable[[F], F]:
    """Mark a hand-written client method with the endpoint functions it calls."""

    def mark(method: F) -> F:
        setattr(method, USES, builders)
        return method

    return mark


def headers_for(call: Call[Any], authorization: Callable[[], str]) -> dict[str, str]:
    out = {"Authorization": authorization()} if call.auth else {}
    if call.idempotency_key is not None:
        out["Idempotency-Key"] = call.idempotency_key
    return out


def proxy_url(config: Config, vm_id: str, port: int, path: str = "", *, websocket: bool = False) -> str:
    """The URL of ``path`` on a server inside the VM, through the API, for a program that sends the API key
    in the ``Authorization`` header (a browser opens ``proxy_ticket``'s URL instead); ``websocket=True``
    gives the ``ws://``/``wss://`` URL."""
    base = config.base_url
    if websocket:
        base = "ws" + base.removeprefix("http")
    return base + vms.proxy_path(vm_id, port, path)
