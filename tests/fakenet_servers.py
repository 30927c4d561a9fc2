"""The fake internet's servers: one asyncio process run by ``tests/fakenet.py`` inside the fake namespace as
``python fakenet_servers.py CONFIG.json``. Standard library and ``dnslib`` only (no ``corral``).

On every host address: HTTP on 80 and HTTPS on 443 (HTTP/1.1 with keep-alive; the certificate chosen by SNI,
else by the address reached) answering 200 with a JSON description of the request (``/bytes/<n>`` answers
``n`` bytes of ``x``), and a UDP listener on 9999 that only logs. On the DNS address: DNS over UDP and TCP for
the host names. On the TCP echo address: a plain echo. Every event is one JSON line in the log file, written
before any answer goes out (so a client that got its answer finds the event logged). Prints ``ready`` once
every socket listens, then nothing more on stdout; SIGTERM stops it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import dnslib  # type: ignore[import-untyped, unused-ignore]  # dnslib ships no types

CHUNK = 64 * 1024
MAX_HEAD = 64 * 1024
DNS_TTL = 60


class EventLog:
    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")

    def write(self, kind: str, addr: str, peer: str, **details: Any) -> None:
        line = json.dumps({"kind": kind, "addr": addr, "peer": peer, **details}, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()


def _addr(sockname: Any) -> str:
    return str(sockname[0]) if isinstance(sockname, tuple) else str(sockname)


def _port(sockname: Any) -> int | None:
    return int(sockname[1]) if isinstance(sockname, tuple) else None


class Servers:
    def __init__(self, config: dict[str, Any]) -> None:
        self.hosts: dict[str, str] = {name.lower(): addr for name, addr in config["hosts"].items()}
        self.dns_addr: str = config["dns_addr"]
        self.http_port: int = config["http_port"]
        self.https_port: int = config["https_port"]
        self.echo_addr: str = config["echo_addr"]
        self.echo_port: int = config["echo_port"]
        self.udp_port: int = config["udp_port"]
        self.log = EventLog(Path(config["log_path"]))
        self.contexts: dict[str, ssl.SSLContext] = {}  # host name -> context with its certificate
        self.by_addr: dict[str, ssl.SSLContext] = {}  # host address -> the same
        for name, (cert, key) in config["certs"].items():
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            ctx.set_alpn_protocols(["http/1.1"])
            self.contexts[name.lower()] = ctx
            self.by_addr[self.hosts[name.lower()]] = ctx

    def handshake_context(self, local: str, seen: list[str | None]) -> ssl.SSLContext:
        """A context for one connection: it has no certificate of its own but, once the ClientHello is in,
        switches to the one of the name asked for (SNI), else of the address reached; ``seen`` gets the
        name (or None), so that even a failed handshake can be logged with it."""

        def on_hello(obj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
            seen.append(name)
            chosen = self.contexts.get(name.lower().rstrip(".")) if name else None
            obj.context = chosen or self.by_addr[local]

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.sni_callback = on_hello
        return ctx

    async def start(self) -> list[asyncio.Server]:
        loop = asyncio.get_running_loop()
        servers: list[asyncio.Server] = []
        for addr in sorted(set(self.hosts.values())):
            servers.append(await asyncio.start_server(self._plain, addr, self.http_port, reuse_address=True))
            servers.append(await asyncio.start_server(self._tls, addr, self.https_port, reuse_address=True))
            await loop.create_datagram_endpoint(lambda: UdpLog(self.log), local_addr=(addr, self.udp_port))
        servers.append(await asyncio.start_server(self._dns_tcp, self.dns_addr, 53, reuse_address=True))
        await loop.create_datagram_endpoint(lambda: DnsUdp(self), local_addr=(self.dns_addr, 53))
        servers.append(
            await asyncio.start_server(self._echo, self.echo_addr, self.echo_port, reuse_address=True)
        )
        return servers

    # --- HTTP(S) ---

    async def _plain(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _guard(writer, self._http(reader, writer, tls=False, sni=None))

    async def _tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local, peer = _addr(writer.get_extra_info("sockname")), _addr(writer.get_extra_info("peername"))
        seen: list[str | None] = []
        try:
            await asyncio.wait_for(writer.start_tls(self.handshake_context(local, seen)), timeout=10)
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            sni = seen[0] if seen else None
            self.log.write("tls_error", local, peer, sni=sni, error=f"{type(exc).__name__}: {exc}")
            writer.transport.abort()
            return
        await _guard(writer, self._http(reader, writer, tls=True, sni=seen[0] if seen else None))

    async def _http(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, tls: bool, sni: str | None
    ) -> None:
        local, peer = _addr(writer.get_extra_info("sockname")), _addr(writer.get_extra_info("peername"))
        peer_port = _port(writer.get_extra_info("peername"))
        kind = "https" if tls else "http"
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # the client closed between requests
            except asyncio.LimitOverrunError:
                await _simple(writer, 431, b"request head too large\n")
                return
            lines = head.decode("latin-1").split("\r\n")
            try:
                method, target, version = lines[0].split(" ")
            except ValueError:
                await _simple(writer, 400, b"bad request line\n")
                return
            headers: list[list[str]] = []
            for line in lines[1:]:
                if not line:
                    continue
                name, sep, value = line.partition(":")
                if not sep:
                    await _simple(writer, 400, b"bad header\n")
                    return
                headers.append([name.strip(), value.strip()])
            fields = {name.lower(): value for name, value in headers}
            if fields.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                body_len = await _read_body(reader, fields)
            except (ValueError, asyncio.IncompleteReadError):
                await _simple(writer, 400, b"bad body\n")
                return
            conn = fields.get("connection", "").lower()
            keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
            self.log.write(
                kind,
                local,
                peer,
                peer_port=peer_port,
                method=method,
                path=target,
                host=fields.get("host"),
                headers=headers,
                sni=sni,
                body_len=body_len,
            )
            head_only = method == "HEAD"
            if target.startswith("/bytes/") and target[len("/bytes/") :].isdigit():
                size = int(target[len("/bytes/") :])
                writer.write(_head(200, "application/octet-stream", size, keep))
                if not head_only:
                    chunk = b"x" * CHUNK
                    left = size
                    while left > 0:
                        writer.write(chunk[: min(left, CHUNK)])
                        left -= CHUNK
                        await writer.drain()
            else:
                body = json.dumps(
                    {
                        "host_addr": local,
                        "peer": peer,
                        "peer_port": peer_port,
                        "method": method,
                        "path": target,
                        "headers": headers,
                        "tls": tls,
                        "sni": sni,
                        "body_len": body_len,
                    }
                ).encode()
                writer.write(_head(200, "application/json", len(body), keep))
                if not head_only:
                    writer.write(body)
            await writer.drain()
            if not keep:
                return

    # --- DNS ---

    def answer(self, data: bytes, local: str, peer: str, proto: str) -> bytes | None:
        try:
            query = dnslib.DNSRecord.parse(data)
        except Exception as exc:  # dnslib raises several kinds on garbage
            self.log.write("dns", local, peer, proto=proto, qname=None, qtype=None, error=str(exc))
            return None
        reply = query.reply()
        qname = str(query.q.qname).rstrip(".").lower()
        qtype = dnslib.QTYPE.get(query.q.qtype, str(query.q.qtype))
        addr = self.hosts.get(qname)
        if addr is None:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
        elif query.q.qtype == dnslib.QTYPE.A:
            reply.add_answer(dnslib.RR(query.q.qname, dnslib.QTYPE.A, rdata=dnslib.A(addr), ttl=DNS_TTL))
        answers = [str(rr.rdata) for rr in reply.rr]
        rcode = dnslib.RCODE.get(reply.header.rcode, str(reply.header.rcode))
        self.log.write(
            "dns", local, peer, proto=proto, qname=qname, qtype=qtype, rcode=rcode, answers=answers
        )
        packed: bytes = reply.pack()
        return packed

    async def _dns_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def serve() -> None:
            local, peer = _addr(writer.get_extra_info("sockname")), _addr(writer.get_extra_info("peername"))
            while True:
                try:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                except asyncio.IncompleteReadError:
                    return
                out = self.answer(data, local, peer, "tcp")
                if out is None:
                    return
                writer.write(len(out).to_bytes(2, "big") + out)
                await writer.drain()

        await _guard(writer, serve())

    # --- TCP echo ---

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local, peer = _addr(writer.get_extra_info("sockname")), _addr(writer.get_extra_info("peername"))
        peer_port = _port(writer.get_extra_info("peername"))
        self.log.write("tcp", local, peer, peer_port=peer_port, phase="open", bytes=0)
        count = 0

        async def serve() -> None:
            nonlocal count
            while data := await reader.read(CHUNK):
                count += len(data)
                writer.write(data)
                await writer.drain()

        try:
            await _guard(writer, serve())
        finally:
            self.log.write("tcp", local, peer, peer_port=peer_port, phase="close", bytes=count)


class UdpLog(asyncio.DatagramProtocol):
    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.local = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.local = _addr(transport.get_extra_info("sockname"))

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.log.write("udp", self.local, _addr(addr), bytes=len(data), data_hex=data[:256].hex())


class DnsUdp(asyncio.DatagramProtocol):
    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self.transport: asyncio.DatagramTransport | None = None
        self.local = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport
        self.local = _addr(transport.get_extra_info("sockname"))

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        out = self.servers.answer(data, self.local, _addr(addr), "udp")
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


async def _read_body(reader: asyncio.StreamReader, fields: dict[str, str]) -> int:
    """Reads (and drops) the request body; returns its length."""
    if "chunked" in fields.get("transfer-encoding", "").lower():
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return total
            await _discard(reader, size)
            await reader.readexactly(2)
            total += size
    length = int(fields.get("content-length", "0") or "0")
    if length < 0:
        raise ValueError("negative content-length")
    await _discard(reader, length)
    return length


async def _discard(reader: asyncio.StreamReader, size: int) -> None:
    while size > 0:
        data = await reader.readexactly(min(size, CHUNK))
        size -= len(data)


_REASONS = {200: "OK", 400: "Bad Request", 431: "Request Header Fields Too Large"}


def _head(status: int, content_type: str, length: int, keep: bool) -> bytes:
    return (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\nConnection: {'keep-alive' if keep else 'close'}\r\n\r\n"
    ).encode()


async def _simple(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
    writer.write(_head(status, "text/plain", len(body), False) + body)
    await writer.drain()


async def _guard(writer: asyncio.StreamWriter, work: Awaitable[None]) -> None:
    """Runs one connection's work; a client that resets or vanishes only ends its connection."""
    try:
        await work
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def main(config: dict[str, Any]) -> None:
    servers = Servers(config)
    listening = await servers.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in listening:
        server.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: fakenet_servers.py CONFIG.json")
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
