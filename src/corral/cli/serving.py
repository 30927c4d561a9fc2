"""How ``corral serve`` listens: the API on ``--host``/``--port``, and the guest proxy's own origin on
``CORRAL_PROXY_PORT`` beside it (``corral.api.guest_origin``), in one uvicorn server whose log lines are
redacted (``corral.cli.logs``)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from corral.api.deps import AppState
from corral.api.guest_http import abort_guest_connections
from corral.api.guest_origin import ByListener, GuestOrigin
from corral.cli.logs import uvicorn_log_config

log = logging.getLogger(__name__)

PROXY_GRACE = 3.0  # seconds proxied requests may still finish once the server is stopping


class _Server(uvicorn.Server):
    """uvicorn's server, whose shutdown does not wait on guests: ``PROXY_GRACE`` seconds after it starts,
    every connection to a guest is cut, so a proxied request to a guest that never answers ends (502)
    instead of holding the restart for its read timeout (300 s)."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        def cut() -> None:
            cut = abort_guest_connections()
            if cut:
                log.info("stopping: cut %d connection(s) to guests", cut)

        timer = asyncio.get_running_loop().call_later(PROXY_GRACE, cut)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``. Its protocol is named (IPPROTO_TCP): asyncio sets TCP_NODELAY only
    on connections of such a socket, and without it every small answer waited ~40 ms for a delayed ACK."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {exc}") from None
    sock.set_inheritable(True)
    return sock


def proxy_listener(host: str) -> socket.socket:
    """The proxy origin's socket, bound now on ``CORRAL_PROXY_PORT`` (0: any free port); the port taken is
    put back in the environment so the app's settings (the URLs tickets give) name it."""
    sock = _bind(host, int(os.environ.get("CORRAL_PROXY_PORT") or 8001))
    os.environ["CORRAL_PROXY_PORT"] = str(sock.getsockname()[1])
    return sock


def run(application: FastAPI, proxy_socket: socket.socket, *, host: str, port: int, **options: Any) -> None:
    """Serve the API and the proxy origin until a signal stops the server (``options``: uvicorn's)."""
    state = application.state.corral
    assert isinstance(state, AppState)
    proxy_port = proxy_socket.getsockname()[1]
    app = ByListener(application, GuestOrigin(state), [proxy_port])
    config = uvicorn.Config(app, host=host, port=port, log_config=uvicorn_log_config(), **options)
    api_socket = _bind(host, port)
    log.info("API on http://%s:%d", host, api_socket.getsockname()[1])
    log.info(
        "Guest proxy origin on %s://<port>-<vm id>.%s:%d",
        state.settings.proxy_scheme,
        state.settings.proxy_domain,
        proxy_port,
    )
    _Server(config).run(sockets=[api_socket, proxy_socket])
