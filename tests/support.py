"""Test helpers: a real ``corral serve`` process, a fresh database per server, signed-up users."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from corral.store.db import normalise_url

PG_URL_ENV = "CORRAL_TEST_DATABASE_URL"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def fresh_database(tmp: Path) -> Iterator[str]:
    """A new, empty database: a SQLite file, or a new database on the PostgreSQL test server."""
    server = os.environ.get(PG_URL_ENV)
    if not server:
        yield f"sqlite:///{tmp / f'corral-{secrets.token_hex(4)}.db'}"
        return
    name = f"corral_test_{secrets.token_hex(6)}"
    admin = create_engine(normalise_url(server), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(normalise_url(server)).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    data_dir: Path
    database_url: str

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0)


REPO = Path(__file__).resolve().parent.parent
IMAGES_DIR = REPO / ".cache" / "images"  # the default image, built once (about 20 s) and kept like .venv


@contextlib.contextmanager
def running_server(tmp: Path, **env_overrides: str) -> Iterator[Server]:
    """Start ``corral serve`` (API only: CORRAL_NODE=off) on a free loopback port with its own data dir and
    database; stop it by PID."""
    data_dir = tmp / f"data-{secrets.token_hex(4)}"
    with (
        fresh_database(tmp) as db_url,
        _serve(tmp, data_dir, db_url, {"CORRAL_NODE": "off", **env_overrides}) as srv,
    ):
        yield srv


@contextlib.contextmanager
def node_server(tmp: Path, *, database_url: str | None = None, **env_overrides: str) -> Iterator[Server]:
    """Start ``corral serve`` with sandboxes on this host. Its data dir is outside pytest's private tmp (a
    sandbox's root must reach its root filesystem); afterwards ``corral node reset`` removes every sandbox,
    mount, cgroup and the disk pool, and the data dir is deleted."""
    data_dir = Path(tempfile.mkdtemp(prefix="corral-test-", dir="/tmp"))
    env = {"CORRAL_IMAGES_DIR": str(IMAGES_DIR), "CORRAL_WARM_POOL_SIZE": "0", **env_overrides}
    try:
        with contextlib.ExitStack() as stack:
            env = {**stack.enter_context(test_network(env)), **env}
            db_url = database_url or stack.enter_context(fresh_database(tmp))
            try:
                with _serve(tmp, data_dir, db_url, env, ready_timeout=300) as srv:
                    yield srv
            finally:
                reset_node(data_dir, env)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.contextmanager
def test_network(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """Settings for a node server's network in a test: its own gateway namespace and, unless ``env`` gives
    CORRAL_UPLINK (a fake internet), as its uplink a namespace made here with nothing in it: no packet of a
    test reaches the host's network."""
    tag = secrets.token_hex(3)
    out = {"CORRAL_GATEWAY_NETNS": f"cgw-{tag}"}
    if "CORRAL_UPLINK" in env:
        yield out
        return
    uplink = f"cup-{tag}"
    subprocess.run(["ip", "netns", "add", uplink], check=True)
    try:
        yield {**out, "CORRAL_UPLINK": f"netns:{uplink}"}
    finally:
        subprocess.run(["ip", "netns", "del", uplink], check=False)


def reset_node(data_dir: Path, env: dict[str, str] | None = None) -> None:
    subprocess.run(
        [sys.executable, "-m", "corral", "node", "reset", "--yes"],
        env={**os.environ, **(env or {}), "CORRAL_DATA_DIR": str(data_dir)},
        check=True,
        capture_output=True,
    )


class NodeHost:
    """A node's data dir and database that outlive its servers: start ``corral serve`` on them, kill it
    with SIGKILL (a crash: its children and sandboxes stay), start it again on the same data dir and
    database. At most one server runs at a time."""

    def __init__(self, tmp: Path, data_dir: Path, database_url: str, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.data_dir = data_dir
        self.database_url = database_url
        self.env = env
        self.server: Server | None = None
        self.logs: list[Path] = []

    @property
    def node_root(self) -> Path:
        return self.data_dir / "node"

    @property
    def node_id(self) -> str:
        return (self.node_root / "node-id").read_text().strip()

    def start(self, ready_timeout: float = 300.0) -> Server:
        assert self.server is None or self.server.proc.poll() is not None, "a server is still running"
        server = _spawn(self.tmp, self.data_dir, self.database_url, self.env)
        self.server = server
        self.logs.append(server.log)
        _wait_ready(server, ready_timeout)
        return server

    def kill(self) -> None:
        """SIGKILL the running server's process (by its PID) and reap it."""
        if self.server is not None and self.server.proc.poll() is None:
            self.server.proc.kill()
            self.server.proc.wait()

    def stop(self) -> None:
        """Shut the running server down cleanly (SIGTERM)."""
        if self.server is not None:
            _shutdown(self.server)

    def restart(self) -> Server:
        """Kill -9 the running server and start a new one on the same data dir and database."""
        self.kill()
        return self.start()

    def log_text(self) -> str:
        return "\n".join(
            f"==> {p.name} <==\n{p.read_text(errors='replace')}" for p in self.logs if p.exists()
        )


@contextlib.contextmanager
def node_host(tmp: Path, *, database_url: str | None = None, **env_overrides: str) -> Iterator[NodeHost]:
    """Like ``node_server``, but the caller starts, kills and restarts the servers (``NodeHost``). At the end
    the running server is stopped, ``corral node reset`` removes every sandbox, mount, cgroup and the disk
    pool, and the data dir is deleted, even when the test failed."""
    data_dir = Path(tempfile.mkdtemp(prefix="corral-test-", dir="/tmp"))
    env = {"CORRAL_IMAGES_DIR": str(IMAGES_DIR), "CORRAL_WARM_POOL_SIZE": "0", **env_overrides}
    try:
        with contextlib.ExitStack() as stack:
            env = {**stack.enter_context(test_network(env)), **env}
            db_url = database_url or stack.enter_context(fresh_database(tmp))
            host = NodeHost(tmp, data_dir, db_url, env)
            try:
                yield host
            finally:
                host.stop()
                reset_node(data_dir, env)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.contextmanager
def _serve(
    tmp: Path, data_dir: Path, db_url: str, env_overrides: dict[str, str], ready_timeout: float = 60.0
) -> Iterator[Server]:
    server = _spawn(tmp, data_dir, db_url, env_overrides)
    try:
        _wait_ready(server, ready_timeout)
        yield server
    finally:
        _shutdown(server)


def _spawn(tmp: Path, data_dir: Path, db_url: str, env_overrides: dict[str, str]) -> Server:
    """Start ``corral serve`` on a free loopback port (without waiting for it to answer)."""
    port = free_port()
    env = {
        **os.environ,
        "CORRAL_DATA_DIR": str(data_dir),
        "CORRAL_DATABASE_URL": db_url,
        "CORRAL_RATE_LIMIT_PER_MINUTE": "1000000",
        "CORRAL_RATE_LIMIT_BURST": "100000",
        "CORRAL_ANON_RATE_LIMIT_PER_MINUTE": "1000000",
        "CORRAL_ANON_RATE_LIMIT_BURST": "100000",
        "CORRAL_SSH_PORT": "0",  # the SSH gateway on any free port (GET /v1/vms/{id}/ssh says which)
        "CORRAL_PROXY_PORT": "0",  # the guest proxy origin on any free port (proxy tickets' URLs say which)
        **env_overrides,
    }
    log = tmp / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "serve", "--port", str(port), "--log-level", "info"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Server(f"http://127.0.0.1:{port}", proc, log, data_dir, db_url)


def _shutdown(server: Server) -> None:
    """SIGTERM the server (its PID only), SIGKILL it if it has not exited within 15 s."""
    if server.proc.poll() is not None:
        return
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


def _wait_ready(server: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"corral serve exited with {server.proc.returncode}:\n{server.log.read_text()}"
            )
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"corral serve did not answer in {timeout} s:\n{server.log.read_text()}")


@dataclass
class Account:
    client: httpx.Client
    token: str
    user: dict[str, object]
    email: str
    password: str


def signup(server: Server, *, first_name: str = "Alice", last_name: str = "Smith") -> Account:
    email = f"user-{secrets.token_hex(6)}@example.com"
    password = "s3cureP@ssword"
    with server.client() as anon:
        resp = anon.post(
            "/v1/users",
            json={"first_name": first_name, "last_name": last_name, "email": email, "password": password},
        )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    token = body["api_key"]["token"]
    return Account(
        client=server.client(token), token=token, user=body["user"], email=email, password=password
    )


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
