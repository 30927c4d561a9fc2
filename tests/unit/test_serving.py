"""The listening sockets ``corral serve`` binds itself (the API's and the proxy origin's): connections
accepted on them get TCP_NODELAY from asyncio, as those of a server uvicorn binds do (without it every small
answer waited for a delayed ACK, ~40 ms)."""

from __future__ import annotations

import asyncio
import socket

from corral.cli.serving import _bind


def test_accepted_connections_get_tcp_nodelay() -> None:
    async def scenario() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listener = _bind("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname())
            try:
                return await asyncio.wait_for(seen, timeout=5)
            finally:
                writer.close()

    assert asyncio.run(scenario()) != 0
