"""The egress process's socket limits on real loopback sockets: asyncio's accept loop out of descriptors
(EMFILE) logs one line per interval through Corral's handler, not a traceback per attempt; the resolver's
DNS-over-TCP connections are capped per client and closed when idle."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

from corral.egress.dns import DnsService, NameMemory, Resolver, Upstream, serve

# Run in a child process (its descriptor limit lowered, not the test's): a server whose accept meets EMFILE.
EMFILE_SERVER = r"""
import asyncio, logging, os, resource, sys
from corral.egress.limits import Throttle
from corral.egress.main import quiet_resource_errors
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
async def main():
    loop = asyncio.get_running_loop()
    if sys.argv[1] == "quiet":
        loop.set_exception_handler(quiet_resource_errors(None, Throttle(10.0)))
    async def keep(reader, writer):
        held.append(writer)
        await asyncio.sleep(3600)
    server = await asyncio.start_server(keep, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(float(sys.argv[2]))
    sys.stderr.flush()
    os._exit(0)  # no shutdown: its cancellations are not what is measured
asyncio.run(main())
"""


def _flood(mode: str, seconds: float) -> str:
    child = subprocess.Popen(
        [sys.executable, "-c", EMFILE_SERVER, mode, str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    clients: list[socket.socket] = []
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        for _ in range(120):  # more than the child's 48 descriptors: the backlog keeps the rest waiting
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        _, err = child.communicate(timeout=seconds + 30)
    finally:
        for c in clients:
            c.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    return err


def test_running_out_of_descriptors_is_one_line_per_interval() -> None:
    loud = _flood("default", 3.0)
    quiet = _flood("quiet", 3.0)
    # asyncio's own handler: a traceback per failed accept, up to a hundred a round
    assert loud.count("socket.accept() out of system resource") > 10
    assert loud.count("Traceback") > 10
    assert "Traceback" not in quiet
    assert quiet.count("out of resources (EMFILE)") == 1
    assert len(quiet) < 1000


def test_dns_over_tcp_is_capped_per_client_and_closed_when_idle() -> None:
    async def scenario() -> tuple[list[bool], bool]:
        async def nobody(_address: str) -> None:
            return None

        service = DnsService(Resolver(Upstream(())), NameMemory(), nobody)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        stop = await serve(service, "127.0.0.1", port, max_tcp_per_client=3, idle=1.0)
        try:
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
            await asyncio.sleep(0.3)
            closed = []
            for reader, _ in conns:
                try:
                    closed.append(await asyncio.wait_for(reader.read(1), 0.2) == b"")
                except TimeoutError:
                    closed.append(False)
            await asyncio.sleep(1.5)
            idle_closed = all([await asyncio.wait_for(r.read(1), 1) == b"" for r, _ in conns[:3]])
            for _, w in conns:
                w.close()
            return closed, idle_closed
        finally:
            stop()

    began = time.monotonic()
    closed, idle_closed = asyncio.run(scenario())
    assert closed == [False, False, False, True, True]  # the two over the cap closed at once
    assert idle_closed  # the three others after the idle timeout
    assert time.monotonic() - began < 30
