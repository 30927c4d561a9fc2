"""The guest proxy's own origin, for browsers, against real sandboxes: ``POST /v1/vms/{id}/proxy-ticket``
gives a one-time URL at ``http://<port>-<vm>.localhost:<proxy port>``; opening it trades the ticket for a
cookie of that VM and port only. Two VMs run tests/sandbox/proxy_guest_server.py; a real headless Chromium
opens a page in each that tries to steal every credential it can reach; what reached the guests is read
from their own logs."""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from corral.api.proxy_tickets import KEY_CHECK_TTL
from tests.sandbox.test_cli_vm import cli
from tests.sandbox.test_proxy import GUEST_PORT, LOG, SERVER, guest_log
from tests.support import Account, Server, signup
from tests.vmtools import create_ready, destroy, run


@pytest.fixture(scope="module")
def owner(node: Server) -> Iterator[Account]:
    acct = signup(node)
    yield acct
    acct.client.close()


def _start_guest(c: httpx.Client) -> dict[str, Any]:
    vm = create_ready(c)
    resp = c.post(
        f"/v1/vms/{vm['id']}/files/upload", params={"path": "/root/server.py"}, content=SERVER.read_bytes()
    )
    assert resp.status_code in (200, 201), resp.text
    run(c, vm["id"], f"nohup python3 /root/server.py {GUEST_PORT} {LOG} > /root/server.out 2>&1 &")
    deadline = time.monotonic() + 20
    while c.get(f"/v1/vms/{vm['id']}/proxy/{GUEST_PORT}/echo").status_code != 200:
        assert time.monotonic() < deadline, run(c, vm["id"], "cat /root/server.out")
        time.sleep(0.05)
    return vm


@pytest.fixture(scope="module")
def vms(owner: Account) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Two VMs of the owner, each with the test server on 127.0.0.1:8700 inside."""
    made: list[dict[str, Any]] = []
    try:
        made.append(_start_guest(owner.client))
        made.append(_start_guest(owner.client))
        yield made[0], made[1]
    finally:
        for vm in made:
            destroy(owner.client, vm["id"])


def ticket(owner: Account, vm_id: str, path: str = "/", port: int = GUEST_PORT) -> dict[str, Any]:
    resp = owner.client.post(f"/v1/vms/{vm_id}/proxy-ticket", json={"port": port, "path": path})
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


class Origin:
    """An HTTP client of the proxy origin of one VM port: it connects to the proxy's loopback port and
    names the VM's host (the system resolver need not resolve *.localhost), keeping cookies by hand."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None
        self.host = f"{parts.hostname}:{parts.port}"
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{parts.port}", headers={"Host": self.host})

    def get(self, target: str, cookie: str | None = None, **headers: str) -> httpx.Response:
        if cookie is not None:
            headers["Cookie"] = cookie
        try:
            return self.http.get(target, headers=headers)
        finally:
            self.http.cookies.clear()  # only the cookies a test names are sent

    def open(self, url: str) -> tuple[httpx.Response, str]:
        """Open a ticket URL: the answer, and the cookie it set (as a request's ``Cookie`` value)."""
        parts = urlsplit(url)
        resp = self.get(f"{parts.path}?{parts.query}")
        assert resp.status_code == 303, resp.text
        return resp, resp.headers["set-cookie"].split(";", 1)[0]

    def close(self) -> None:
        self.http.close()


def entries(owner: Account, vm_id: str, marker: str) -> list[dict[str, Any]]:
    return [e for e in guest_log(owner, vm_id) if marker in e["target"]]


# ---- access control -----------------------------------------------------------------------------------------


def test_a_ticket_opens_one_vm_port_once_and_becomes_a_cookie(
    owner: Account, vms: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    a, b = vms
    got = ticket(owner, a["id"], "/echo?m=origin-1&x=1")
    assert got["expires_in"] == 60
    assert urlsplit(got["origin"]).hostname == f"{GUEST_PORT}-{a['id'].replace('_', '-')}.localhost"
    assert got["url"].startswith(got["origin"] + "/echo?m=origin-1&x=1&corral_ticket=")
    assert owner.token not in got["url"]
    origin = Origin(got["url"])
    try:
        resp, cookie = origin.open(got["url"])
        assert resp.headers["location"] == "/echo?m=origin-1&x=1"  # the same URL without the ticket
        assert resp.headers["cache-control"] == "no-store"
        attributes = {p.strip().split("=")[0].lower() for p in resp.headers["set-cookie"].split(";")[1:]}
        assert {"httponly", "path", "max-age", "samesite"} <= attributes
        assert "domain" not in attributes  # host-only: no other host name gets it
        assert cookie.startswith("corral_proxy=")
        page = origin.get("/echo?m=origin-1&x=1", cookie=f"app=kept; {cookie}")
        assert page.status_code == 200, page.text
        assert page.headers.get_list("set-cookie") == ["a=1", "b=2"]  # the guest's own cookies, here
        assert page.headers.get_list("content-security-policy") == ["frame-ancestors 'self'"]  # not sandboxed
        seen = {n.lower(): v for n, v in page.json()["headers"]}
        assert seen["cookie"] == "app=kept"  # the proxy's cookie never reaches the guest
        assert "corral_ticket" not in json.dumps(guest_log(owner, a["id"]))
        # escapes in the path and query reach the guest as the client wrote them, through the redirect too
        escaped = ticket(owner, a["id"], "/echo/a%20b%2Fc?m=origin-esc&y=a%2Fb&flag")
        moved, esc_cookie = origin.open(escaped["url"])
        assert moved.headers["location"] == "/echo/a%20b%2Fc?m=origin-esc&y=a%2Fb&flag"
        page = origin.get(moved.headers["location"], cookie=esc_cookie)
        assert page.json()["target"] == "/echo/a%20b%2Fc?m=origin-esc&y=a%2Fb&flag"
        # the ticket is spent
        again = origin.get(urlsplit(got["url"]).path + "?" + urlsplit(got["url"]).query)
        assert again.status_code == 401
        assert again.json()["error"]["code"] == "unauthorized"
        # no cookie, a forged one, or an API key: nothing gets through
        for attempt in (
            origin.get("/echo?m=origin-none"),
            origin.get("/echo?m=origin-forged", cookie="corral_proxy=forged"),
            origin.get("/echo?m=origin-key", Authorization=f"Bearer {owner.token}"),
            origin.get(f"/echo?m=origin-query&token={owner.token}"),
        ):
            assert attempt.status_code == 401, attempt.text
        # another VM's page may not use the cookie (fetch from another origin under the domain)
        other_site = origin.get("/echo?m=origin-same-site", cookie=cookie, **{"Sec-Fetch-Site": "same-site"})
        assert other_site.status_code == 401
        assert not entries(owner, a["id"], "m=origin-none")
        assert not entries(owner, a["id"], "m=origin-forged")
        assert not entries(owner, a["id"], "m=origin-key")
        assert not entries(owner, a["id"], "m=origin-query")
        assert not entries(owner, a["id"], "m=origin-same-site")
        # the cookie of A's port opens neither another port of A nor B
        for vm_id, port in ((a["id"], GUEST_PORT + 1), (b["id"], GUEST_PORT)):
            elsewhere = Origin(ticket(owner, vm_id, port=port)["origin"] + "/")
            try:
                resp = elsewhere.get("/echo?m=origin-elsewhere", cookie=cookie)
                assert resp.status_code == 401, (vm_id, port, resp.text)
            finally:
                elsewhere.close()
        assert not entries(owner, b["id"], "m=origin-elsewhere")
        # the cookie and the ticket cannot call the API
        value = cookie.split("=", 1)[1]
        ticket_value = parse_qs(urlsplit(got["url"]).query)["corral_ticket"][0]
        for credential in (value, ticket_value):
            assert (
                owner.client.get(
                    "/v1/users/me", headers={"Authorization": f"Bearer {credential}"}
                ).status_code
                == 401
            )
    finally:
        origin.close()


def test_a_ticket_for_another_vm_or_port_opens_nothing(
    owner: Account, vms: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    a, b = vms
    for vm_id, port in ((a["id"], GUEST_PORT + 1), (b["id"], GUEST_PORT)):
        for_a = ticket(owner, a["id"], "/echo?m=origin-moved")
        query = urlsplit(for_a["url"]).query
        elsewhere = Origin(ticket(owner, vm_id, port=port)["origin"] + "/")
        try:
            resp = elsewhere.get(f"/echo?m=origin-moved&{query}")
            assert resp.status_code == 401, resp.text
            assert "set-cookie" not in resp.headers
        finally:
            elsewhere.close()
        home = Origin(for_a["url"])
        try:  # and it is spent: presented on the wrong host once, it opens nothing on its own
            assert home.get(f"/echo?{query}").status_code == 401
        finally:
            home.close()
    assert not entries(owner, a["id"], "m=origin-moved")
    assert not entries(owner, b["id"], "m=origin-moved")


def test_another_tenant_gets_no_ticket(
    node: Server, owner: Account, vms: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    a, _ = vms
    stranger = signup(node, first_name="Eve", last_name="Other")
    with stranger.client as c:
        resp = c.post(f"/v1/vms/{a['id']}/proxy-ticket", json={"port": GUEST_PORT})
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "vm_not_found"
    with httpx.Client(base_url=node.url) as anon:
        assert anon.post(f"/v1/vms/{a['id']}/proxy-ticket", json={"port": GUEST_PORT}).status_code == 401
    for bad in ({"port": 0}, {"port": 65536}, {"port": "8700"}, {"port": GUEST_PORT, "path": "/a b"}):
        resp = owner.client.post(f"/v1/vms/{a['id']}/proxy-ticket", json=bad)
        assert resp.status_code in (400, 422), (bad, resp.text)
        assert "error" in resp.json()


def test_websockets_on_the_origin_take_the_cookie(
    owner: Account, vms: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    a, _ = vms
    got = ticket(owner, a["id"], "/")
    origin = Origin(got["url"])
    try:
        _, cookie = origin.open(got["url"])
    finally:
        origin.close()
    port = urlsplit(got["url"]).port
    assert port is not None
    url = f"ws://{origin.host}/ws?m=origin-ws"  # connected to the proxy's loopback port, named by host

    def loopback() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=10)

    with ws_connect(url, sock=loopback(), additional_headers={"Cookie": f"{cookie}; app=1"}) as ws:
        ws.send("through the origin")
        assert ws.recv(timeout=5) == "through the origin"
    seen = {n.lower(): v for n, v in entries(owner, a["id"], "m=origin-ws")[0]["headers"]}
    assert seen["cookie"] == "app=1"
    for headers in ({}, {"Cookie": cookie, "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "websocket"}):
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(
                url.replace("origin-ws", "origin-ws-refused"), sock=loopback(), additional_headers=headers
            )
        assert refused.value.response.status_code == 401
    assert not entries(owner, a["id"], "origin-ws-refused")
    assert refused.value.response.status_code == 401


# ---- a real browser -----------------------------------------------------------------------------------------


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver_path):
        pytest.fail("chromium and chromedriver are required (make test installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _open_page(driver: webdriver.Chrome, url: str) -> None:
    driver.get(url)
    # chromedriver can fail a check while the page is being replaced: try again
    WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return document.title") == "done"
    )


def _stolen(owner: Account, vm_id: str, marker: str) -> dict[str, Any]:
    """What the page with ``marker`` reported to its guest."""
    found = [
        json.loads(parse_qs(urlsplit(e["target"]).query)["d"][0])
        for e in entries(owner, vm_id, "/exfil")
        if marker in e["target"]
    ]
    assert len(found) == 1, found
    report: dict[str, Any] = found[0]
    return report


def test_a_guest_page_in_a_browser_gets_no_credential(
    node: Server, owner: Account, vms: tuple[dict[str, Any], dict[str, Any]], chromium: webdriver.Chrome
) -> None:
    a, b = vms
    origin_a = ticket(owner, a["id"])["origin"]
    origin_b = ticket(owner, b["id"])["origin"]
    assert urlsplit(origin_a).hostname != urlsplit(origin_b).hostname  # two VMs, two origins
    assert urlsplit(origin_a).hostname != urlsplit(node.url).hostname  # neither is the API's
    got_a = ticket(owner, a["id"], f"/page?m=browser-a&api={node.url}&other={origin_b}")
    got_b = ticket(owner, b["id"], f"/page?m=browser-b&api={node.url}&other={origin_a}")

    _open_page(chromium, got_a["url"])
    assert "corral_ticket" not in chromium.current_url  # redirected without it
    jar = {c["name"]: c for c in chromium.get_cookies()}
    host_a = urlsplit(origin_a).hostname
    assert jar["corral_proxy"]["httpOnly"] is True
    assert jar["corral_proxy"]["domain"] == host_a  # host-only
    assert jar["corral_proxy"]["value"] != "forged-by-the-guest"  # the guest cannot replace it
    assert jar["guest"]["domain"] == host_a  # the guest's Domain=localhost was dropped
    session_cookie = jar["corral_proxy"]["value"]
    _open_page(chromium, got_b["url"])

    everything = json.dumps(guest_log(owner, a["id"])) + json.dumps(guest_log(owner, b["id"]))
    assert owner.token not in everything
    assert "corral_ticket" not in everything
    assert session_cookie not in everything
    for got in (got_a, got_b):
        assert parse_qs(urlsplit(got["url"]).query)["corral_ticket"][0] not in everything

    report_a = _stolen(owner, a["id"], "browser-a")
    report_b = _stolen(owner, b["id"], "browser-b")
    for report in (report_a, report_b):
        assert "corral_ticket" not in report["href"]
        assert owner.email not in json.dumps(report["calls"])  # the API told the page nothing
        assert not report["calls"]["me"].startswith("200")
        assert "corral_proxy" not in report["cookie"]  # HttpOnly
        # whatever the page could read, none of it calls the API
        candidates = {
            v
            for text in (report["href"], report["search"], report["cookie"], json.dumps(report["storage"]))
            for v in (
                *[x for vals in parse_qs(urlsplit(text).query).values() for x in vals],
                *[c.split("=", 1)[-1].strip() for c in text.split(";")],
            )
            if v
        } | {session_cookie}
        for value in candidates:
            resp = owner.client.get("/v1/users/me", headers={"Authorization": f"Bearer {value}"})
            assert resp.status_code == 401, value
    # the page of VM B could not read VM A (nor make A's guest serve it with the browser's cookie)
    assert not report_b["calls"]["other"].startswith("200")
    assert not entries(owner, a["id"], "m=cross")
    # A's page reached its own guest through the proxy, without the proxy's cookie
    self_seen = report_a["calls"]["self"]
    assert self_seen.startswith("200")
    assert "corral_proxy" not in self_seen


def test_a_guest_page_on_the_api_origin_runs_no_script(
    node: Server, owner: Account, vms: tuple[dict[str, Any], dict[str, Any]], chromium: webdriver.Chrome
) -> None:
    """Defence in depth: a browser that sends the API key in a header (here through DevTools) still gets
    the page sandboxed: an opaque origin, no script."""
    a, _ = vms
    chromium.execute_cdp_cmd("Network.enable", {})
    chromium.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {owner.token}"}}
    )
    chromium.get(f"{node.url}/v1/vms/{a['id']}/proxy/{GUEST_PORT}/page?m=api-origin&api={node.url}")
    WebDriverWait(chromium, 30, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )
    assert chromium.execute_script("return document.body.innerText").strip() == "guest page"  # it loaded
    assert chromium.title == "page"  # the script's first statement never ran
    assert chromium.get_cookies() == []
    assert not [e for e in entries(owner, a["id"], "/exfil") if "api-origin" in e["target"]]


# ---- logs ---------------------------------------------------------------------------------------------------


def test_the_servers_log_holds_no_key_nor_ticket(
    node: Server, owner: Account, vms: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """Terminal and shell WebSockets still take ``?token=`` (a browser cannot set their headers): the access
    log line of every such request, and of a ticket's, is redacted."""
    a, _ = vms
    ws_base = node.url.replace("http://", "ws://")
    with ws_connect(f"{ws_base}/v1/vms/{a['id']}/shell?token={owner.token}", open_timeout=10) as ws:
        ws.close()
    with httpx.Client(base_url=node.url) as anon:
        anon.get(f"/v1/vms/{a['id']}/terminal", params={"token": owner.token})
        anon.get(f"/v1/vms/{a['id']}/proxy/{GUEST_PORT}/echo", params={"token": owner.token})
    deadline = time.monotonic() + 5
    while f"/v1/vms/{a['id']}/proxy/{GUEST_PORT}/echo?token=" not in node.log.read_text():
        assert time.monotonic() < deadline, "the request was not logged"
        time.sleep(0.05)
    assert owner.token not in node.log.read_text()
    got = ticket(owner, a["id"], "/echo?m=logged")
    origin = Origin(got["url"])
    try:
        origin.open(got["url"])
    finally:
        origin.close()
    ticket_value = parse_qs(urlsplit(got["url"]).query)["corral_ticket"][0]
    deadline = time.monotonic() + 5
    while "corral_ticket=[redacted]" not in node.log.read_text():  # the access line is written after
        assert time.monotonic() < deadline, "the ticket's request was not logged"
        time.sleep(0.05)
    log = node.log.read_text()
    assert owner.token not in log
    assert ticket_value not in log
    assert f"/v1/vms/{a['id']}/shell?token=[redacted]" in log
    assert "corral_live_" not in log


# ---- the CLI ------------------------------------------------------------------------------------------------


def test_corral_vm_open_prints_a_ticket_url(
    node: Server, owner: Account, vms: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    a, _ = vms
    done = cli(node, owner, "open", a["name"], str(GUEST_PORT), "--path", "/echo?m=cli-open", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert urlsplit(url).hostname == f"{GUEST_PORT}-{a['id'].replace('_', '-')}.localhost"
    assert owner.token not in url
    origin = Origin(url)
    try:
        resp, cookie = origin.open(url)
        assert resp.headers["location"] == "/echo?m=cli-open"
        assert origin.get("/echo?m=cli-open", cookie=cookie).status_code == 200
    finally:
        origin.close()
    stranger = signup(node, first_name="Eve", last_name="Other")
    stranger.client.close()
    refused = cli(node, stranger, "open", a["id"], str(GUEST_PORT), cwd=tmp_path)
    assert refused.returncode != 0
    assert "vm_not_found" in refused.stderr or "not found" in refused.stderr.lower()


def test_revoking_the_key_ends_its_proxy_sessions(
    node: Server, owner: Account, vms: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """A ticket and its cookie last no longer than the API key that asked for them (give or take the few
    seconds the key's check is cached)."""
    a, _ = vms
    made = owner.client.post("/v1/api-keys", json={"name": "for-the-browser"})
    assert made.status_code == 201, made.text
    key = made.json()
    with node.client(key["token"]) as c:
        first = c.post(f"/v1/vms/{a['id']}/proxy-ticket", json={"port": GUEST_PORT, "path": "/echo?m=rev-1"})
        second = c.post(f"/v1/vms/{a['id']}/proxy-ticket", json={"port": GUEST_PORT, "path": "/echo?m=rev-2"})
    assert first.status_code == second.status_code == 201
    origin = Origin(first.json()["url"])
    try:
        _, cookie = origin.open(first.json()["url"])
        assert origin.get("/echo?m=rev-before", cookie=cookie).status_code == 200
        assert owner.client.delete(f"/v1/api-keys/{key['id']}").status_code == 204
        time.sleep(KEY_CHECK_TTL)  # "this key is live" is cached that long
        assert origin.get("/echo?m=rev-after", cookie=cookie).status_code == 401
        unspent = urlsplit(second.json()["url"])
        assert origin.get(f"{unspent.path}?{unspent.query}").status_code == 401
    finally:
        origin.close()
    assert not entries(owner, a["id"], "m=rev-after")
    assert not entries(owner, a["id"], "m=rev-2")
