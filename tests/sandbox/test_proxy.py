"""The guest port proxy, ``/v1/vms/{id}/proxy/{port}/{path}``, against a real sandbox: a server started inside
it (tests/sandbox/proxy_guest_server.py, bound to the sandbox's 127.0.0.1 only) is reached through the API
over HTTP and WebSocket; what the server saw is read from its own log. The proxy's own origin, for
browsers, is tested in test_proxy_origin.py."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.support import Account, Server, signup
from tests.vmtools import create_ready, destroy, run

GUEST_PORT = 8700
LOG = "/root/proxy-guest.log"
SERVER = Path(__file__).with_name("proxy_guest_server.py")
MIB = 1024 * 1024
PATTERN = bytes(range(256)) * 4096  # what the guest's /download repeats


@pytest.fixture(scope="module")
def owner(node: Server) -> Iterator[Account]:
    acct = signup(node)
    yield acct
    acct.client.close()


@pytest.fixture(scope="module")
def vm(owner: Account) -> Iterator[dict[str, Any]]:
    """A VM running the test server on 127.0.0.1:8700 inside."""
    c = owner.client
    vm = create_ready(c)
    try:
        resp = c.post(
            f"/v1/vms/{vm['id']}/files/upload",
            params={"path": "/root/server.py"},
            content=SERVER.read_bytes(),
        )
        assert resp.status_code in (200, 201), resp.text
        run(c, vm["id"], f"nohup python3 /root/server.py {GUEST_PORT} {LOG} > /root/server.out 2>&1 &")
        deadline = time.monotonic() + 20
        while c.get(proxied(vm["id"], "/echo")).status_code != 200:
            assert time.monotonic() < deadline, run(c, vm["id"], "cat /root/server.out")
            time.sleep(0.05)
        yield vm
    finally:
        destroy(c, vm["id"])


def proxied(vm_id: str, path: str, port: int = GUEST_PORT) -> str:
    return f"/v1/vms/{vm_id}/proxy/{port}{path}"


def guest_log(owner: Account, vm_id: str) -> list[dict[str, Any]]:
    out = run(owner.client, vm_id, f"cat {LOG}")["stdout"]
    return [json.loads(line) for line in out.splitlines()]


def seen_by_guest(owner: Account, vm_id: str, marker: str) -> dict[str, Any]:
    """The guest's log entry of the request whose target contains ``marker``."""
    entries = [e for e in guest_log(owner, vm_id) if marker in e["target"]]
    assert len(entries) == 1, entries
    return entries[0]


def header_names(entry: dict[str, Any]) -> set[str]:
    return {name.lower() for name, _ in entry["headers"]}


def rss_kib(server: Server) -> int:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ---- HTTP ---------------------------------------------------------------------------------------------------


def test_get_with_query_reaches_the_server_inside(owner: Account, vm: dict[str, Any]) -> None:
    resp = owner.client.get(proxied(vm["id"], "/echo/a%20b?m=get-1&y=a%2Fb&token=not-for-the-guest&z"))
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["method"] == "GET"
    assert got["target"] == "/echo/a%20b?m=get-1&y=a%2Fb&z"  # escapes kept, token removed
    assert resp.headers.get_list("x-repeat") == ["1", "2"]  # repeated headers pass through
    assert len(resp.headers.get_list("date")) == 1
    # on the API's origin the guest sets no cookie, and a browser would give its page an opaque origin
    assert resp.headers.get_list("set-cookie") == []
    assert resp.headers.get_list("content-security-policy") == ["sandbox"]
    seen = seen_by_guest(owner, vm["id"], "m=get-1")
    headers = {name.lower(): value for name, value in seen["headers"]}
    assert "authorization" not in headers
    assert headers["host"] == f"127.0.0.1:{GUEST_PORT}"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-prefix"] == f"/v1/vms/{vm['id']}/proxy/{GUEST_PORT}"
    assert headers["x-forwarded-host"] == owner.client.base_url.netloc.decode()


def test_a_query_token_is_not_accepted(node: Server, owner: Account, vm: dict[str, Any]) -> None:
    """A browser given ``?token=<api key>`` would hand it to the guest's page (location.search): the API's
    path takes the key from the Authorization header only; browsers use proxy tickets."""
    with httpx.Client(base_url=node.url) as anon:
        resp = anon.get(proxied(vm["id"], "/echo"), params={"m": "by-token", "token": owner.token})
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == "unauthorized"
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(ws_url(node, vm["id"], "/ws") + f"?m=ws-by-token&token={owner.token}", open_timeout=10)
        assert refused.value.response.status_code == 401
    assert not [e for e in guest_log(owner, vm["id"]) if "by-token" in e["target"]]


def test_content_length_with_transfer_encoding_is_forwarded_chunked(
    node: Server, owner: Account, vm: dict[str, Any]
) -> None:
    """Both headers (uvicorn takes the pair and de-chunks the body): the guest gets the body chunked, no
    500 and no traceback in the server's log."""
    host, port = node.url.removeprefix("http://").split(":")
    request = (
        f"POST {proxied(vm['id'], '/echo?m=cl-and-te')} HTTP/1.1\r\n".encode()
        + f"Host: {host}:{port}\r\nAuthorization: Bearer {owner.token}\r\n".encode()
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"5\r\nhello\r\n0\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 201"), answer
    body = answer.split(b"\r\n\r\n", 1)[1]
    if b"transfer-encoding: chunked" in answer.split(b"\r\n\r\n", 1)[0].lower():
        body = httpx.Response(200, content=body, headers={"transfer-encoding": "chunked"}).content
    got = json.loads(body)
    assert got["body"] == "hello"
    sent = {name.lower(): value for name, value in got["headers"]}
    assert sent.get("transfer-encoding") == "chunked"
    assert "content-length" not in sent
    assert "LocalProtocolError" not in node.log.read_text()


def test_methods_and_bodies(owner: Account, vm: dict[str, Any]) -> None:
    c = owner.client
    resp = c.post(proxied(vm["id"], "/echo?m=post"), json={"hello": "guest"})
    assert resp.status_code == 201
    assert json.loads(resp.json()["body"]) == {"hello": "guest"}
    # a body without a length is sent on chunked
    resp = c.put(proxied(vm["id"], "/echo?m=put"), content=iter([b"part one, ", b"part two"]))
    assert resp.status_code == 200
    assert resp.json()["method"] == "PUT"
    assert resp.json()["body"] == "part one, part two"
    for method in ("PATCH", "DELETE", "OPTIONS"):
        resp = c.request(method, proxied(vm["id"], f"/echo?m={method}"))
        assert resp.status_code == 200
        assert resp.json()["method"] == method
    head = c.head(proxied(vm["id"], "/echo?m=head"))
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) > 0
    missing = c.get(proxied(vm["id"], "/no-such-page"))  # the guest's own statuses pass through
    assert missing.status_code == 404
    assert missing.json() == {"error": "no such page"}


def test_expect_continue_is_answered_by_the_api_server(
    node: Server, owner: Account, vm: dict[str, Any]
) -> None:
    host, port = node.url.removeprefix("http://").split(":")
    request = (
        f"POST {proxied(vm['id'], '/echo/%C3%A9?m=expect')} HTTP/1.1\r\n".encode()
        + f"Host: {host}:{port}\r\nAuthorization: Bearer {owner.token}\r\n".encode()
        + b"Expect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        head = sock.recv(65536)
        if head.startswith(b"HTTP/1.1 100"):  # the API server asks for the body, once
            head = head.split(b"\r\n\r\n", 1)[1]
        sock.sendall(b"ok")
        answer = head + b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 201"), answer
    got = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert got["target"] == "/echo/%C3%A9?m=expect"
    assert got["body"] == "ok"
    assert "expect" not in {name.lower() for name, _ in got["headers"]}


def test_the_guests_root_and_redirects(owner: Account, vm: dict[str, Any]) -> None:
    c = owner.client
    bare = c.get(proxied(vm["id"], ""), params={"m": "bare"})
    assert bare.status_code == 307
    assert bare.headers["location"].endswith(proxied(vm["id"], "/") + "?m=bare")
    moved = c.get(proxied(vm["id"], "/redirect"))
    assert moved.status_code == 302
    assert moved.headers["location"] == proxied(vm["id"], "/echo?from=redirect")
    followed = c.get(proxied(vm["id"], "/redirect"), follow_redirects=True)
    assert followed.status_code == 200
    assert followed.json()["target"] == "/echo?from=redirect"


def _download(node: Server, owner: Account, vm_id: str, size: int, chunked: bool) -> None:
    digest, got, peak = hashlib.sha256(), 0, 0
    start_rss = rss_kib(node)
    params = {"size": str(size), "chunked": "1" if chunked else "0"}
    with owner.client.stream("GET", proxied(vm_id, "/download"), params=params, timeout=120) as resp:
        assert resp.status_code == 200
        assert ("content-length" in resp.headers) is not chunked
        for piece in resp.iter_bytes(MIB):
            digest.update(piece)
            got += len(piece)
            if got % (16 * MIB) < len(piece):
                peak = max(peak, rss_kib(node))
    expected = hashlib.sha256()
    for _ in range(size // MIB):
        expected.update(PATTERN)
    assert got == size
    assert digest.hexdigest() == expected.hexdigest()
    # the server relays as it reads: its memory does not grow with the size of the download
    assert peak - start_rss < 64 * 1024, (start_rss, peak)


def test_a_large_download_is_streamed(node: Server, owner: Account, vm: dict[str, Any]) -> None:
    _download(node, owner, vm["id"], 200 * MIB, chunked=False)


def test_a_chunked_download_is_streamed(node: Server, owner: Account, vm: dict[str, Any]) -> None:
    _download(node, owner, vm["id"], 64 * MIB, chunked=True)


def guest_connections(owner: Account, vm_id: str) -> int:
    """Established TCP connections to the test server inside the VM (from /proc/net/tcp, as the VM sees it)."""
    out = run(owner.client, vm_id, "cat /proc/net/tcp /proc/net/tcp6")["stdout"]
    local = f":{GUEST_PORT:04X}"
    return sum(
        1
        for line in out.splitlines()[1:]
        if len(f := line.split()) > 3 and f[1].endswith(local) and f[3] == "01"
    )


def test_a_client_that_leaves_stops_the_download(node: Server, owner: Account, vm: dict[str, Any]) -> None:
    params = {"size": str(20 * 1024 * MIB), "chunked": "1"}  # 20 GiB: it would take minutes to send
    with owner.client.stream("GET", proxied(vm["id"], "/download"), params=params) as resp:
        got = 0
        for piece in resp.iter_bytes(MIB):
            got += len(piece)
            if got >= 8 * MIB:
                assert guest_connections(owner, vm["id"]) == 1  # the download, relayed as it comes
                break  # closes the connection to the API server
    deadline = time.monotonic() + 10
    while guest_connections(owner, vm["id"]):
        assert time.monotonic() < deadline, "the proxy kept reading from the guest after the client left"
        time.sleep(0.1)


def test_a_large_upload_is_streamed(node: Server, owner: Account, vm: dict[str, Any]) -> None:
    size = 128 * MIB
    expected = hashlib.sha256()
    peak = [rss_kib(node)]
    start = peak[0]

    def body() -> Iterator[bytes]:
        for i in range(size // MIB):
            expected.update(PATTERN)
            if i % 16 == 0:
                peak.append(rss_kib(node))
            yield PATTERN

    resp = owner.client.post(proxied(vm["id"], "/upload"), content=body(), timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"size": size, "sha256": expected.hexdigest()}
    assert max(peak) - start < 64 * 1024, (start, peak)
    # with a length, and over the API's body limit (1 MiB): the proxy takes any size
    data = PATTERN * 8
    resp = owner.client.post(proxied(vm["id"], "/upload"), content=data)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_an_answer_the_guest_breaks_off_never_looks_complete(owner: Account, vm: dict[str, Any]) -> None:
    for chunked in ("0", "1"):
        with owner.client.stream("GET", proxied(vm["id"], "/broken"), params={"chunked": chunked}) as resp:
            assert resp.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                resp.read()
    hangup = owner.client.get(proxied(vm["id"], "/hangup"))
    assert hangup.status_code == 502
    assert hangup.json()["error"]["code"] == "upstream_unreachable"


# ---- who may, and what fails ----------------------------------------------------------------------------------


def test_only_the_owner_gets_through(node: Server, owner: Account, vm: dict[str, Any]) -> None:
    stranger = signup(node, first_name="Eve", last_name="Other")
    with stranger.client as c:
        for resp in (
            c.get(proxied(vm["id"], "/echo?m=stranger")),
            c.post(proxied(vm["id"], "/echo?m=stranger"), content=b"x"),
        ):
            assert resp.status_code == 404
            assert resp.json()["error"]["code"] == "vm_not_found"
    with httpx.Client(base_url=node.url) as anon:
        resp = anon.get(proxied(vm["id"], "/echo?m=anon"))
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "unauthorized"
        resp = anon.get(proxied(vm["id"], "/echo?m=anon"), headers=bearer("corral_live_wrong"))
        assert resp.status_code == 401
    unknown = owner.client.get(proxied("vm_doesnotexist000000", "/echo"))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "vm_not_found"
    assert not [e for e in guest_log(owner, vm["id"]) if "stranger" in e["target"] or "anon" in e["target"]]


def test_ports_with_nothing_behind_them(owner: Account, vm: dict[str, Any]) -> None:
    c = owner.client
    closed = c.get(proxied(vm["id"], "/", port=GUEST_PORT + 1))
    assert closed.status_code == 502
    assert closed.json()["error"]["code"] == "upstream_unreachable"
    for port in ("0", "65536", "http", "-1"):
        resp = c.get(f"/v1/vms/{vm['id']}/proxy/{port}/")
        assert resp.status_code == 400, (port, resp.text)
        assert resp.json()["error"]["code"] == "invalid_parameter"


def test_a_stopped_vm_answers_409(owner: Account) -> None:
    c = owner.client
    vm = create_ready(c)
    try:
        assert c.post(f"/v1/vms/{vm['id']}/stop").status_code == 200
        resp = c.get(proxied(vm["id"], "/"))
        assert resp.status_code == 409
        assert resp.json()["error"]["code"] == "vm_not_running"
    finally:
        destroy(c, vm["id"])


# ---- WebSocket ----------------------------------------------------------------------------------------------


def ws_url(node: Server, vm_id: str, path: str) -> str:
    return node.url.replace("http://", "ws://") + proxied(vm_id, path)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_websocket_echo_text_binary_and_close_code(node: Server, owner: Account, vm: dict[str, Any]) -> None:
    url = ws_url(node, vm["id"], "/ws") + "?m=ws-1"
    with ws_connect(
        url,
        subprotocols=["echo.v1"],  # type: ignore[list-item]
        max_size=4 * MIB,
        additional_headers=bearer(owner.token),
    ) as ws:
        assert ws.subprotocol == "echo.v1"
        ws.send("hello, guest")
        assert ws.recv(timeout=5) == "hello, guest"
        ws.send(b"\x00\x01binary\xff")
        assert ws.recv(timeout=5) == b"\x00\x01binary\xff"
        big = bytes(range(256)) * 4096
        ws.send(big)
        assert ws.recv(timeout=10) == big
        ws.send("close:4001")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4001
    assert closed.value.rcvd.reason == "bye"
    seen = seen_by_guest(owner, vm["id"], "m=ws-1")
    assert seen["target"] == "/ws?m=ws-1"
    assert owner.token not in json.dumps(seen)
    assert "authorization" not in header_names(seen)


def test_websocket_with_a_header_key_and_a_client_close(
    node: Server, owner: Account, vm: dict[str, Any]
) -> None:
    url = ws_url(node, vm["id"], "/ws") + "?m=ws-2"
    with ws_connect(url, additional_headers=bearer(owner.token)) as ws:
        ws.send("one")
        assert ws.recv(timeout=5) == "one"
        ws.close(4002, "done")
    assert ws.close_code == 4002  # the guest answered the close with the client's code, relayed back
    assert "authorization" not in header_names(seen_by_guest(owner, vm["id"], "m=ws-2"))


def test_websocket_refusals(node: Server, owner: Account, vm: dict[str, Any]) -> None:
    stranger = signup(node, first_name="Eve", last_name="Other")
    stranger.client.close()
    url = ws_url(node, vm["id"], "/ws")
    cases = [
        (url, {}, 401),
        (url, bearer(stranger.token), 404),
        (url.replace(f"/{GUEST_PORT}/", f"/{GUEST_PORT + 1}/"), bearer(owner.token), 502),
        (url.replace(f"/{GUEST_PORT}/", "/0/"), bearer(owner.token), 400),
        (ws_url(node, vm["id"], "/not-a-websocket"), bearer(owner.token), 404),  # the guest's own answer
    ]
    for target, headers, status in cases:
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(target, open_timeout=10, additional_headers=headers)
        assert refused.value.response.status_code == status, target
