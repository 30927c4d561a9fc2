"""Another tenant attacks the guest proxy's origin, on a proxy domain that is not ``localhost`` (Chromium makes
each ``*.localhost`` name its own site, which hides cross-VM attacks; on ``corral.test`` all VM origins are
one site, as on a real deployment). Tenants A (the attacker) and B each run one VM with
tests/sandbox/proxy_guest_server.py; a real headless Chromium resolves ``*.corral.test`` to 127.0.0.1. The
server of this module is stopped by its last test (shutdown while a guest never answers)."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from tests.sandbox.test_proxy import GUEST_PORT
from tests.sandbox.test_proxy_origin import Origin, _start_guest, entries
from tests.support import Account, Server, node_server, signup
from tests.vmtools import destroy, run

DOMAIN = "corral.test"
EVIL_PORT = 8701  # A's page (python3 -m http.server)
STALLED_PORT = 8702  # listen(0), never accept: connects to it wait
SILENT_PORT = 8703  # accepts, never answers
CLOSED_PORT = 8704  # nothing listens


@dataclass
class Site:
    server: Server
    a: Account
    b: Account
    vm_a: dict[str, Any]
    vm_b: dict[str, Any]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with node_server(
        tmp_path_factory.mktemp("proxy-attacks"),
        CORRAL_PROXY_DOMAIN=DOMAIN,
        CORRAL_MAX_CONCURRENT_REQUESTS="40",  # the worker threads of sync endpoints, scaled down
        CORRAL_RATE_LIMIT_PER_MINUTE="3000",
        CORRAL_RATE_LIMIT_BURST="300",
    ) as srv:
        a = signup(srv, first_name="Mallory", last_name="A")
        b = signup(srv, first_name="Bob", last_name="B")
        made: list[tuple[Account, dict[str, Any]]] = []
        try:
            made.append((a, _start_guest(a.client)))
            made.append((b, _start_guest(b.client)))
            yield Site(srv, a, b, made[0][1], made[1][1])
        finally:
            if srv.proc.poll() is None:
                for acct, vm in made:
                    destroy(acct.client, vm["id"])
            a.client.close()
            b.client.close()


def ticket(acct: Account, vm_id: str, path: str = "/", port: int = GUEST_PORT) -> dict[str, Any]:
    resp = acct.client.post(f"/v1/vms/{vm_id}/proxy-ticket", json={"port": port, "path": path})
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


def in_vm(acct: Account, vm_id: str, name: str, source: str, port: int) -> None:
    """Start a small python3 server (``source``) in the VM and wait until ``port`` listens."""
    resp = acct.client.post(
        f"/v1/vms/{vm_id}/files/upload", params={"path": f"/root/{name}.py"}, content=source.encode()
    )
    assert resp.status_code in (200, 201), resp.text
    run(acct.client, vm_id, f"nohup python3 /root/{name}.py > /root/{name}.out 2>&1 &")
    deadline = time.monotonic() + 20
    while f":{port} " not in run(acct.client, vm_id, "ss -ltn")["stdout"]:
        assert time.monotonic() < deadline, run(acct.client, vm_id, f"cat /root/{name}.out")
        time.sleep(0.1)


# ---- a real browser -----------------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
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
        f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


EVIL_PAGE = """<!doctype html><html><head><title>page</title></head><body>
<iframe src="http://{b}/echo?m=framed"></iframe><script>
const out = {{}};
const done = () => {{ if ("ws" in out && "post" in out) document.title = "done " + JSON.stringify(out); }};
const ws = new WebSocket("ws://{b}/ws?m=hijack");
ws.onopen = () => ws.send("sent by A's page");
ws.onmessage = (e) => {{ out.ws = "echo " + e.data; ws.close(); done(); }};
ws.onclose = (e) => {{ if (!("ws" in out)) out.ws = "closed " + e.code; done(); }};
fetch("http://{b}/echo?m=csrf-post", {{method: "POST", mode: "no-cors", credentials: "include", body: "A"}})
  .then(() => {{ out.post = "sent"; done(); }}, (e) => {{ out.post = "error " + e; done(); }});
</script></body></html>
"""

EVIL_SERVER = f"""import http.server, functools
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory="/root/site")
http.server.ThreadingHTTPServer(("127.0.0.1", {EVIL_PORT}), handler).serve_forever()
"""

OWN_ORIGIN_SCRIPT = """
const finish = arguments[arguments.length - 1];
(async () => {
const out = {};
const ws = new WebSocket("ws://" + location.host + "/ws?m=own-ws");
ws.onopen = () => ws.send("own page");
ws.onmessage = (e) => { out.ws = e.data; ws.close(); };
ws.onerror = () => { out.ws = "error"; };
const post = await fetch("/echo?m=own-post", {method: "POST", body: "own"});
out.post = post.status;
const deadline = Date.now() + 10000;
while (!("ws" in out) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
finish(out);
})();
"""


def _wait_title(driver: webdriver.Chrome, prefix: str) -> str:
    WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(
        lambda d: str(d.execute_script("return document.title")).startswith(prefix)
    )
    return str(driver.execute_script("return document.title"))


def test_another_vms_page_cannot_drive_this_vms_app_with_the_users_session(
    site: Site, browser: webdriver.Chrome
) -> None:
    """H1 (cross-site WebSocket hijacking, CSRF between VM origins) and framing by another VM's page."""
    b_origin = ticket(site.b, site.vm_b["id"])["origin"]
    b_host = urlsplit(b_origin).netloc
    resp = site.a.client.post(
        f"/v1/vms/{site.vm_a['id']}/files/upload",
        params={"path": "/root/site/index.html"},
        content=EVIL_PAGE.format(b=b_host).encode(),
    )
    assert resp.status_code in (200, 201), resp.text
    in_vm(site.a, site.vm_a["id"], "evil", EVIL_SERVER, EVIL_PORT)

    browser.get(ticket(site.b, site.vm_b["id"], "/echo?m=b-opens-its-app")["url"])  # B's session cookie
    assert entries(site.b, site.vm_b["id"], "m=b-opens-its-app")
    browser.get_log("browser")  # type: ignore[no-untyped-call]  # drop what came before
    browser.get(ticket(site.a, site.vm_a["id"], "/index.html", port=EVIL_PORT)["url"])  # a link from A
    report = json.loads(_wait_title(browser, "done ")[len("done ") :])
    assert not report["ws"].startswith("echo"), report  # the handshake was refused
    assert not entries(site.b, site.vm_b["id"], "m=hijack")  # B's guest saw neither
    assert not entries(site.b, site.vm_b["id"], "m=csrf-post")
    time.sleep(1)  # the frame's answer is in
    console = json.dumps(browser.get_log("browser"))  # type: ignore[no-untyped-call]
    assert "frame-ancestors" in console or "X-Frame-Options" in console, console  # B's page not framed

    # B's own page still opens WebSockets and posts to its own origin
    browser.get(f"{b_origin}/echo?m=b-again")
    own = browser.execute_async_script(OWN_ORIGIN_SCRIPT)
    assert own == {"ws": "own page", "post": 201}, own
    seen = {n.lower(): v for n, v in entries(site.b, site.vm_b["id"], "m=own-ws")[0]["headers"]}
    assert seen["origin"] == b_origin


def _raw_get(
    port: int, host: str, target: str, headers: dict[str, str] | None = None
) -> http.client.HTTPResponse:
    """A request whose target is sent exactly as written (``//x`` is a path here, not an authority)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host)
    for name, value in (headers or {}).items():
        conn.putheader(name, value)
    conn.endheaders()
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


@pytest.mark.parametrize(
    "path", ["//evil.example/x", "/%2F%2Fevil.example", "/\\evil.example", "///evil.example"]
)
def test_a_ticket_redirects_only_within_its_origin(site: Site, path: str) -> None:
    """L3: the 303 after a ticket is a path on the same origin, never ``//another.host``."""
    got = ticket(site.a, site.vm_a["id"])
    parts = urlsplit(got["url"])
    assert parts.port is not None
    resp = _raw_get(parts.port, parts.netloc, f"{path}?{parts.query}")
    assert resp.status == 303
    location = resp.getheader("location") or ""
    assert location.startswith("/"), location
    assert location[1:2] not in ("/", "\\"), location
    assert urlsplit(location).netloc == ""
    assert "max-age=3600" in (resp.getheader("set-cookie") or "").lower()  # CORRAL_PROXY_SESSION_TTL


def test_cross_origin_requests_are_refused_before_the_guest(site: Site) -> None:
    """H1 without a browser: a handshake or a POST naming another VM's origin is refused with 403."""
    got = ticket(site.b, site.vm_b["id"])
    origin = Origin(got["url"])
    try:
        _, cookie = origin.open(got["url"])
        other = (
            f"http://{GUEST_PORT}-{site.vm_a['id'].replace('_', '-')}.{DOMAIN}:{urlsplit(got['url']).port}"
        )
        refused = origin.http.post("/echo?m=cross-post", headers={"Cookie": cookie, "Origin": other})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "cross_origin"
        own = origin.http.post("/echo?m=own-post-2", headers={"Cookie": cookie, "Origin": got["origin"]})
        assert own.status_code == 201, own.text
        framed = origin.get("/echo?m=frame-headers", cookie=cookie)
        assert framed.headers["x-frame-options"] == "SAMEORIGIN"
        assert "frame-ancestors 'self'" in framed.headers.get_list("content-security-policy")
    finally:
        origin.close()
    assert not entries(site.b, site.vm_b["id"], "m=cross-post")
    assert entries(site.b, site.vm_b["id"], "m=own-post-2")


# ---- resources ----------------------------------------------------------------------------------------------

STALLED_SERVER = f"""import socket, time
s = socket.socket()
s.bind(("127.0.0.1", {STALLED_PORT}))
s.listen(0)
time.sleep(3600)
"""

SILENT_SERVER = f"""import socket, time
s = socket.socket()
s.bind(("127.0.0.1", {SILENT_PORT}))
s.listen(64)
held = []
while True:
    held.append(s.accept())
"""


def _session(acct: Account, vm_id: str, port: int) -> tuple[Origin, str]:
    got = ticket(acct, vm_id, port=port)
    origin = Origin(got["url"])
    _, cookie = origin.open(got["url"])
    return origin, cookie


def test_stalled_proxy_requests_of_one_tenant_leave_the_api_to_others(site: Site) -> None:
    """H3: 100 proxied requests at once to a guest port whose connects never complete hold no worker
    thread; beyond the cap per key they get 429, and B's ``GET /v1/vms`` answers within 1 s all along."""
    in_vm(site.a, site.vm_a["id"], "stalled", STALLED_SERVER, STALLED_PORT)
    origin, cookie = _session(site.a, site.vm_a["id"], STALLED_PORT)
    origin.close()
    port = int(origin.host.rsplit(":", 1)[1])
    codes: dict[str, int] = {}
    slow: list[float] = []
    answers = 0

    async def attack(c: httpx.AsyncClient, stop: float) -> None:
        while time.monotonic() < stop:
            try:
                r = await c.get("/")
            except httpx.ReadTimeout:  # the one connection the guest's backlog took waits for an answer
                codes["no answer"] = codes.get("no answer", 0) + 1
                continue
            key = (
                f"{r.status_code} {r.json()['error']['code']}" if r.status_code >= 400 else str(r.status_code)
            )
            codes[key] = codes.get(key, 0) + 1
            if r.status_code == 429:
                await asyncio.sleep(0.5)

    async def probe(stop: float) -> None:
        nonlocal answers
        async with httpx.AsyncClient(base_url=site.server.url, timeout=30) as c:
            headers = {"Authorization": f"Bearer {site.b.token}"}
            while time.monotonic() < stop:
                t = time.monotonic()
                r = await c.get("/v1/vms", headers=headers)
                assert r.status_code == 200, r.text
                answers += 1
                if time.monotonic() - t > 1.0:
                    slow.append(time.monotonic() - t)
                await asyncio.sleep(0.2)

    async def main() -> None:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        headers = {"Host": origin.host, "Cookie": cookie}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=15, limits=limits
        ) as c:
            stop = time.monotonic() + 12
            await asyncio.gather(*[attack(c, stop) for _ in range(100)], probe(stop))

    asyncio.run(main())
    assert answers >= 10
    assert not slow, (slow, codes)
    assert codes.get("429 too_many_concurrent", 0) > 0, codes  # 64 per key at once
    assert codes.get("502 upstream_unreachable", 0) > 0, codes  # the connects timed out


def test_proxy_origin_requests_are_charged_to_the_vms_rate_limit(site: Site) -> None:
    """H3: requests with a valid cookie are rate limited per VM (burst 300 here), the API key's own bucket
    is untouched."""
    origin, cookie = _session(site.a, site.vm_a["id"], CLOSED_PORT)
    try:
        codes: dict[str, int] = {}
        for _ in range(500):
            r = origin.get("/", cookie=cookie)
            key = f"{r.status_code} {r.json()['error']['code']}"
            codes[key] = codes.get(key, 0) + 1
            if "429 rate_limited" in codes:
                assert r.headers.get("retry-after")
                break
    finally:
        origin.close()
    assert codes.get("429 rate_limited", 0) == 1, codes
    assert site.a.client.get("/v1/vms").status_code == 200


def test_a_guest_that_never_answers_does_not_hold_the_shutdown(site: Site) -> None:
    """Info: SIGTERM while a proxied request waits for a guest that never answers: the server exits within
    seconds (the guest connections are cut after a short grace), not after the read timeout (300 s).
    Runs last: it stops this module's server."""
    in_vm(site.a, site.vm_a["id"], "silent", SILENT_SERVER, SILENT_PORT)
    origin, cookie = _session(site.a, site.vm_a["id"], SILENT_PORT)
    result: list[Any] = []

    def waiting() -> None:
        try:
            result.append(origin.get("/waits", cookie=cookie).status_code)
        except httpx.HTTPError as exc:
            result.append(type(exc).__name__)

    thread = threading.Thread(target=waiting)
    thread.start()
    deadline = time.monotonic() + 10
    while f":{SILENT_PORT} " not in run(site.a.client, site.vm_a["id"], "ss -tnH")["stdout"]:
        assert time.monotonic() < deadline, "the request did not reach the guest"
        time.sleep(0.1)
    started = time.monotonic()
    site.server.proc.send_signal(signal.SIGTERM)
    try:
        site.server.proc.wait(timeout=20)
    except Exception:
        pytest.fail("corral serve still runs 20 s after SIGTERM")
    finally:
        thread.join(timeout=30)
        origin.close()
    assert time.monotonic() - started < 15
    assert result, "the request did not end"
