"""The SDK's pure layer and both clients over httpx.MockTransport: requests as the API expects them, models
parsed strictly (a renamed field fails) but tolerant of new fields, errors by status with the API's code,
retries (429 with Retry-After, connection errors; never a POST that may have taken effect), pagination,
the exec stream's SSE cut anywhere, configuration."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import corral
from corral.sdk import async_client, retry, sync_client
from corral.sdk.endpoints import account, vms
from corral.sdk.models import ExecExit, ExecOutput, Vm
from corral.sdk.sse import ExecEvents, SseParser

URL = "http://corral.test"
KEY = "ck_test_key"
NOW = "2026-02-28T12:00:00Z"
VM = {
    "id": "vm_abc",
    "name": "dev",
    "status": "running",
    "status_detail": "ready",
    "created_at": NOW,
    "updated_at": NOW,
    "image": "debian:bookworm",
    "vcpus": 1,
    "mem_mib": 1024,
    "disk_mib": 4096,
}
Handler = Callable[[httpx.Request], httpx.Response]


def error(
    status: int, code: str, message: str = "no", headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}}, headers=headers)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits both clients would make, recorded instead of waited."""
    waits: list[float] = []

    async def async_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(sync_client, "sleep", waits.append)
    monkeypatch.setattr(async_client, "sleep", async_sleep)
    return waits


def client(handler: Handler, **kwargs: Any) -> corral.Client:
    return corral.Client(KEY, URL, transport=httpx.MockTransport(handler), **kwargs)


def aclient(handler: Handler, **kwargs: Any) -> corral.AsyncClient:
    return corral.AsyncClient(KEY, URL, transport=httpx.MockTransport(handler), **kwargs)


# ---- requests and models -------------------------------------------------------------------------------


def test_create_sends_the_documented_request_and_parses_the_vm() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={**VM, "timeout": 30, "expires_at": NOW, "brand_new_field": [1]})

    with client(handler) as c:
        vm = c.vms.create(name="dev", public_key="ssh-ed25519 AAAA", vcpus=2, timeout=30)
    request = seen[0]
    assert (request.method, request.url.path) == ("POST", "/v1/vms")
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["user-agent"].startswith("corral-python/")
    assert json.loads(request.content) == {
        "name": "dev",
        "public_key": "ssh-ed25519 AAAA",
        "vcpus": 2,
        "timeout": 30,
    }
    assert isinstance(vm, Vm)
    assert vm.id == "vm_abc"
    assert vm.vcpus == 1
    assert vm.timeout == 30
    assert vm.created_at == datetime(2026, 2, 28, 12, tzinfo=UTC)
    assert vm.expires_at == datetime(2026, 2, 28, 12, tzinfo=UTC)
    assert vm.model_extra == {"brand_new_field": [1]}  # a field a newer server adds is kept, not refused


def test_a_renamed_field_fails_to_parse() -> None:
    renamed = {k: v for k, v in VM.items() if k != "status_detail"} | {"detail": "ready"}
    with (
        client(lambda _: httpx.Response(200, json=renamed)) as c,
        pytest.raises(corral.UnexpectedResponseError) as err,
    ):
        c.vms.get("vm_abc")
    assert "status_detail" in str(err.value)


def test_path_parameters_stay_one_segment_and_queries_drop_what_is_left_out() -> None:
    call = account.get_env("A/B C")
    assert call.path == "/v1/env/A%2FB%20C"
    listing = vms.list_vms(status="running", limit=5)
    assert listing.query() == {"status": "running", "limit": "5"}
    usage = account.usage(from_="2026-02-01", vm_id="vm_1")
    assert usage.query() == {"from": "2026-02-01", "vm_id": "vm_1"}
    audit = account.list_egress_events(allowed=False, since=datetime(2026, 1, 1, tzinfo=UTC))
    assert audit.query() == {"allowed": "false", "since": "2026-01-01T00:00:00+00:00"}
    proxied = vms.proxy_request("vm_1", 8080, "/a/b c?x=1")
    assert proxied.path == "/v1/vms/vm_1/proxy/8080/a/b%20c%3Fx%3D1"
    with pytest.raises(ValueError, match="port"):
        vms.proxy_request("vm_1", 0)


def test_update_secret_sends_only_what_is_given_and_none_clears_the_comment() -> None:
    assert account.update_secret("sec_1", hosts=["a.example"]).json == {"hosts": ["a.example"]}
    assert account.update_secret("sec_1", comment=None).json == {"comment": None}


def test_exec_waits_longer_than_the_commands_timeout() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        out = {"exit_code": 0, "stdout": "hi\n", "stderr": "", "stdout_truncated": False}
        return httpx.Response(
            200, json=out | {"stderr_truncated": False, "timed_out": False, "duration_ms": 3}
        )

    with client(handler, timeout=10) as c:
        result = c.vms.exec("vm_abc", ["echo", "hi"], timeout=600, env={"A": "1"})
    assert result.stdout == "hi\n"
    assert result.exit_code == 0
    assert json.loads(seen[0].content) == {"command": ["echo", "hi"], "timeout": 600, "env": {"A": "1"}}
    assert seen[0].extensions["timeout"]["read"] == 630
    assert seen[0].extensions["timeout"]["connect"] == 10


def test_envelopes_data_and_lists() -> None:
    snap = {
        "id": "snap_1",
        "source_virtual_machine_id": "vm_abc",
        "source_base_image": "debian:bookworm",
        "source_snapshot_id": None,
        "label": None,
        "status": "pending",
        "r2_key": None,
        "size_bytes": None,
        "created_at": NOW,
        "memory": True,
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/fork"):
            return httpx.Response(201, json={"data": [VM, {**VM, "id": "vm_def"}]})
        return httpx.Response(201, json={"data": snap})

    with client(handler) as c:
        assert [v.id for v in c.vms.fork("vm_abc", count=2)] == ["vm_abc", "vm_def"]
        assert c.snapshots.create("vm_abc", label="x").id == "snap_1"


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, corral.BadRequestError),
        (401, corral.AuthenticationError),
        (404, corral.NotFoundError),
        (409, corral.ConflictError),
        (422, corral.ValidationError),
        (500, corral.ServerError),
        (507, corral.ServerError),
        (405, corral.APIStatusError),
    ],
)
def test_errors_by_status_carry_the_api_code(status: int, kind: type[corral.CorralError]) -> None:
    with client(lambda _: error(status, "some_code", "what went wrong")) as c, pytest.raises(kind) as err:
        c.env.get("A")
    assert (err.value.status, err.value.code, err.value.message) == (status, "some_code", "what went wrong")
    assert isinstance(err.value, corral.CorralError)


def test_an_error_that_is_not_the_envelope_keeps_the_status_and_body() -> None:
    with (
        client(lambda _: httpx.Response(502, text="Bad Gateway from nginx")) as c,
        pytest.raises(corral.ServerError) as err,
    ):
        c.vms.get("vm_abc")
    assert (err.value.code, err.value.message) == ("http_502", "Bad Gateway from nginx")


# ---- retries -------------------------------------------------------------------------------------------


def test_429_is_retried_after_retry_after_even_for_a_post(sleeps: list[float]) -> None:
    answers = iter(
        [
            error(429, "rate_limited", headers={"Retry-After": "3"}),
            error(429, "rate_limited"),
            httpx.Response(201, json=VM),
        ]
    )
    posts: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(request.content)
        return next(answers)

    with client(handler) as c:
        assert c.vms.create(name="dev", public_key="k").id == "vm_abc"
    assert sleeps == [3.0, retry.DEFAULT_RETRY_AFTER]
    assert len(posts) == 3
    assert len(set(posts)) == 1


def test_429_past_max_retries_raises_rate_limit_error(sleeps: list[float]) -> None:
    calls: list[int] = []

    def handler(_: httpx.Request) -> httpx.Response:
        calls.append(1)
        return error(429, "rate_limited", "slow down", {"Retry-After": "2"})

    with client(handler, max_retries=2) as c, pytest.raises(corral.RateLimitError) as err:
        c.secrets.list()
    assert len(calls) == 3
    assert sleeps == [2.0, 2.0]
    assert err.value.retry_after == 2.0
    assert err.value.code == "rate_limited"


def test_the_async_client_honours_retry_after_too(sleeps: list[float]) -> None:
    answers = iter([error(429, "rate_limited", headers={"Retry-After": "5"}), httpx.Response(200, json=VM)])

    async def main() -> str:
        async with aclient(lambda _: next(answers)) as c:
            return (await c.vms.get("vm_abc")).id

    assert asyncio.run(main()) == "vm_abc"
    assert sleeps == [5.0]


def test_connection_errors_retry_idempotent_requests_only(sleeps: list[float]) -> None:
    attempts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request.method)
        if len(attempts) < 3:
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response(200, json=VM)

    with client(handler) as c:
        assert c.vms.get("vm_abc").id == "vm_abc"
    assert attempts == ["GET"] * 3
    assert sleeps == [0.25, 0.5]

    attempts.clear()
    with client(handler) as c, pytest.raises(corral.APIConnectionError):
        c.vms.stop("vm_abc")  # the POST may have reached the server: not sent again
    assert attempts == ["POST"]


def test_a_connection_never_made_is_retried_for_a_post(sleeps: list[float]) -> None:
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=VM)

    with client(handler) as c:
        assert c.vms.start("vm_abc").id == "vm_abc"
    assert len(attempts) == 2


def test_uploads_are_resent_whole_after_429(sleeps: list[float], tmp_path: Path) -> None:
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        if len(bodies) % 2:
            return error(429, "rate_limited", headers={"Retry-After": "0"})
        return httpx.Response(201, json={"path": request.url.params["path"], "size": len(bodies[-1])})

    big = tmp_path / "big"
    big.write_bytes(b"x" * 600_000)  # more than one chunk
    with client(handler) as c:
        assert c.vms.upload("vm_abc", "/a", big, mode=0o755).size == 600_000
        buf = io.BytesIO(b"skip:payload")
        buf.read(5)
        assert c.vms.upload("vm_abc", "/b", buf).size == 7
    assert bodies == [b"x" * 600_000] * 2 + [b"payload"] * 2

    class Pipe(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            return 0

    with client(handler) as c, pytest.raises(corral.RateLimitError):
        c.vms.upload("vm_abc", "/c", io.BufferedReader(Pipe()))  # cannot be sent twice: no retry


def test_retry_decisions() -> None:
    assert retry.after_status(503, {}, 0, 3) is None
    assert retry.after_status(429, {"Retry-After": "1.5"}, 0, 3) == 1.5
    assert retry.after_status(429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0, 3) == 1.0
    assert retry.after_status(429, {"Retry-After": "99999"}, 0, 3) == retry.MAX_RETRY_AFTER
    assert retry.after_status(429, {}, 3, 3) is None
    assert retry.after_status(429, {}, 0, 3, replayable=False) is None
    request = httpx.Request("DELETE", URL)
    assert retry.after_error("DELETE", httpx.ReadTimeout("t", request=request), 0, 3) == 0.25
    assert retry.after_error("POST", httpx.ReadTimeout("t", request=request), 0, 3) is None
    assert retry.after_error("POST", httpx.ConnectTimeout("t", request=request), 0, 3) == 0.25
    assert retry.after_error("GET", httpx.UnsupportedProtocol("x", request=request), 0, 3) is None


# ---- pagination ----------------------------------------------------------------------------------------


def test_iter_follows_cursors_with_the_same_filters() -> None:
    queries: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        q = dict(request.url.params)
        queries.append(q)
        page = {None: (["a", "b"], "c1"), "c1": (["c"], "c2"), "c2": ([], None)}[q.get("cursor")]
        data = [{**VM, "id": f"vm_{i}", "name": i} for i in page[0]]
        return httpx.Response(200, json={"data": data, "has_more": page[1] is not None, "cursor": page[1]})

    with client(handler) as c:
        assert [v.id for v in c.vms.iter(status="running", sort="name", limit=2)] == ["vm_a", "vm_b", "vm_c"]
        first = c.vms.list(status="running", sort="name", limit=2)
    assert first.has_more
    assert first.cursor == "c1"
    assert len(first.data) == 2
    assert queries[:3] == [
        {"status": "running", "sort": "name", "limit": "2"},
        {"status": "running", "sort": "name", "limit": "2", "cursor": "c1"},
        {"status": "running", "sort": "name", "limit": "2", "cursor": "c2"},
    ]

    async def collect() -> list[str]:
        async with aclient(handler) as ac:
            return [v.name async for v in ac.vms.iter(status="running")]

    assert asyncio.run(collect()) == ["a", "b", "c"]


# ---- SSE -----------------------------------------------------------------------------------------------

STREAM = (
    'event: stdout\ndata: {"data": "h\\u00e9llo "}\n\n'
    ": keep-alive\n\n"
    'event: stderr\r\ndata: {"data": "\u2603 warn"}\r\n\r\n'
    'event: progress\ndata: {"x": 1}\n\n'
    'event: exit\ndata: {"exit_code": 3, "timed_out": false, "duration_ms": 12}\n\n'
).encode()
EXPECTED = [
    ExecOutput(stream="stdout", data="héllo "),
    ExecOutput(stream="stderr", data="☃ warn"),
    ExecExit(exit_code=3, timed_out=False, duration_ms=12),
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
def test_sse_events_come_out_whole_however_the_bytes_are_cut(size: int) -> None:
    parser = ExecEvents()
    events = [e for i in range(0, len(STREAM), size) for e in parser.feed(STREAM[i : i + size])]
    assert events == EXPECTED
    assert parser.exit == EXPECTED[-1]


def test_sse_multiline_data_and_crlf_cut_between_chunks() -> None:
    parser = SseParser()
    assert parser.feed(b"data: one\r") == []
    assert parser.feed(b"\ndata: two\r") == []
    out = parser.feed(b"\n\r\n")
    assert [(e.event, e.data) for e in out] == [("message", "one\ntwo")]


class Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    def __init__(self, data: bytes, size: int) -> None:
        self.parts = [data[i : i + size] for i in range(0, len(data), size)]

    def __iter__(self) -> Iterator[bytes]:
        yield from self.parts

    async def __aiter__(self) -> Any:
        for part in self.parts:
            yield part


def test_exec_stream_yields_typed_events_in_both_clients() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/vms/vm_abc/exec/stream"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Chunks(STREAM, 5))

    with client(handler) as c, c.vms.exec_stream("vm_abc", "echo") as stream:
        assert list(stream) == EXPECTED
        assert stream.exit == EXPECTED[-1]

    async def main() -> list[Any]:
        async with aclient(handler) as ac:
            stream = await ac.vms.exec_stream("vm_abc", "echo")
            return [e async for e in stream]

    assert asyncio.run(main()) == EXPECTED


def test_an_exec_stream_cut_before_the_exit_is_an_error() -> None:
    cut = STREAM[: STREAM.index(b"event: exit")]
    with client(lambda _: httpx.Response(200, stream=Chunks(cut, 100))) as c:
        stream = c.vms.exec_stream("vm_abc", "echo")
        with pytest.raises(corral.APIConnectionError, match="before the command's exit"):
            list(stream)


def test_exec_stream_errors_raise_at_the_call() -> None:
    with client(lambda _: error(409, "vm_not_running")) as c, pytest.raises(corral.ConflictError):
        c.vms.exec_stream("vm_abc", "echo")


# ---- files ---------------------------------------------------------------------------------------------


def test_download_and_download_to(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["path"] == "/etc/x"
        return httpx.Response(200, stream=Chunks(data, 4096))

    with client(handler) as c:
        assert c.vms.download("vm_abc", "/etc/x") == data
        assert c.vms.download_to("vm_abc", "/etc/x", tmp_path / "out") == len(data)
    assert (tmp_path / "out").read_bytes() == data

    async def main() -> bytes:
        async with aclient(handler) as ac:
            buf = io.BytesIO()
            assert await ac.vms.download_to("vm_abc", "/etc/x", buf) == len(data)
            assert await ac.vms.download("vm_abc", "/etc/x") == data
            return buf.getvalue()

    assert asyncio.run(main()) == data


# ---- waiting -------------------------------------------------------------------------------------------


def test_wait_ready_polls_until_ready_and_raises_for_a_failed_vm(sleeps: list[float]) -> None:
    details = iter(["queued", "creating", "ready"])
    with client(
        lambda _: httpx.Response(200, json={**VM, "status": "pending", "status_detail": next(details)})
    ) as c:
        assert c.vms.wait_ready("vm_abc").status_detail == "ready"
    assert len(sleeps) == 2

    failed = {**VM, "status": "failed", "status_detail": "failed", "failure_reason": "crun said no"}
    with client(lambda _: httpx.Response(200, json=failed)) as c, pytest.raises(corral.WaitError) as err:
        c.vms.wait_ready("vm_abc")
    assert err.value.code == "vm_failed"
    assert "crun said no" in err.value.message


# ---- configuration -------------------------------------------------------------------------------------


@pytest.fixture
def no_login(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("CORRAL_URL", raising=False)
    monkeypatch.delenv("CORRAL_API_KEY", raising=False)
    return tmp_path


def test_config_from_arguments_environment_or_the_cli_login(
    no_login: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral.cli import credentials

    with corral.Client() as c:
        assert c.base_url == credentials.DEFAULT_URL
        with pytest.raises(corral.ConfigError, match="corral login"):
            c.vms.list()  # no key: nothing is sent
    credentials.save("http://saved.test:9000/", "ck_saved")
    with corral.Client() as c:
        assert (c.config.base_url, c.config.api_key) == ("http://saved.test:9000", "ck_saved")
    with corral.Client(base_url="http://other.test") as c:
        assert c.config.api_key is None  # the saved key goes only to its own server
    monkeypatch.setenv("CORRAL_URL", "http://env.test")
    monkeypatch.setenv("CORRAL_API_KEY", "ck_env")
    with corral.Client() as c:
        assert (c.config.base_url, c.config.api_key) == ("http://env.test", "ck_env")
    with corral.Client("ck_arg", "http://arg.test/") as c:
        assert (c.config.base_url, c.config.api_key) == ("http://arg.test", "ck_arg")
        assert "ck_arg" not in repr(c.config)
        assert c.vms.proxy_url("vm_1", 3000, "/x?y=1") == "http://arg.test/v1/vms/vm_1/proxy/3000/x?y=1"
        assert "ck_arg" not in c.vms.proxy_url("vm_1", 3000, websocket=True)  # the key is never in a URL
        call = vms.proxy_ticket("vm_1", 3000, "/app?x=1")
        assert (call.route.method, call.path, call.json) == (
            "POST",
            "/v1/vms/vm_1/proxy-ticket",
            {"port": 3000, "path": "/app?x=1"},
        )
    with pytest.raises(corral.ConfigError):
        corral.Client("k", "ftp://nope")


def test_signup_needs_no_key(no_login: Path) -> None:
    signup = {
        "api_key": {"id": "key_1", "name": "default", "token": "ck_new", "created_at": NOW},
        "user": {
            "id": "usr_1",
            "first_name": "A",
            "last_name": "B",
            "email": "a@b.c",
            "email_verified": False,
            "created_at": NOW,
        },
    }

    def handler(request: httpx.Request) -> httpx.Response:
        assert "authorization" not in request.headers
        return httpx.Response(201, json=signup)

    with corral.Client(base_url=URL, transport=httpx.MockTransport(handler)) as c:
        assert (
            c.users.create(first_name="A", last_name="B", email="a@b.c", password="pw12345678").api_key.token
            == "ck_new"
        )


def test_importing_corral_loads_no_server_code() -> None:
    import subprocess
    import sys

    code = (
        "import sys, corral; assert 'httpx' not in sys.modules; corral.Client; "
        "print(sorted(m for m in ('fastapi', 'sqlalchemy', 'starlette', 'corral.api', 'corral.store', 'typer') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
