"""``corral egress``: the egress process, run inside the gateway namespace (``corral serve`` starts it with
``ip netns exec``, which also mounts the namespace's own /sys). It serves the transparent proxy and the
resolver on the gateway, reads policy and secrets from the store, and writes audit events to it."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError, StatementError

from corral.config import Settings
from corral.domain.egress_policy import Decision, Forbidden
from corral.egress.addon import EgressAddon, TopLevelOnly, audit_event
from corral.egress.auditlog import AuditWriter
from corral.egress.dns import DnsService, NameMemory, Resolver, Upstream, serve
from corral.egress.hostns import HostCalls, host_netns_fd
from corral.egress.limits import Caps, Throttle, held_note
from corral.egress.state import StateWatcher, VmEntry
from corral.net import plan as netplan
from corral.net.plan import NetPlan
from corral.node.setup import net_plan
from corral.security.secretbox import AesGcmCipher, load_or_create_key
from corral.services import audit
from corral.services.audit import NewEvent
from corral.store.db import make_engine, session_factory

log = logging.getLogger(__name__)

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
READY_FILE = "egress.ready"
PID_FILE = "egress.pid"
POLICY_STALE = 10.0  # seconds without a successful policy read before the probe answers "stale"


class SandboxIndex:
    """Which VM a sandbox address belongs to: the slot's link in the gateway carries its container id (the
    VM's id) as its alias, read from the gateway's /sys."""

    def __init__(self, plan: NetPlan, watcher: StateWatcher, sys_net: Path = Path("/sys/class/net")) -> None:
        self.plan = plan
        self.watcher = watcher
        self.sys_net = sys_net

    def vm_id(self, address: str) -> str | None:
        slot = netplan.address_slot(self.plan, address)
        if slot is None:
            return None
        try:
            alias = (self.sys_net / netplan.link_name(slot) / "ifalias").read_text().strip()
        except OSError:
            return None
        return alias or None

    async def entry(self, address: str) -> VmEntry | None:
        vm_id = self.vm_id(address)
        if vm_id is None:
            return None
        found = self.watcher.current.get(vm_id)
        if found is None:  # a VM newer than the last reload: read again (bounded) before refusing
            snapshot = await asyncio.to_thread(self.watcher.wait_next, 5.0)
            found = snapshot.get(vm_id)
            if found is None:
                log.warning("traffic from %s (container %s), which is no live VM: refused", address, vm_id)
        return found


def upstream_bundle(settings: Settings) -> Path:
    """The CAs the proxy trusts upstream when it intercepts: the host's, plus ``upstream_ca``."""
    parts = []
    if SYSTEM_BUNDLE.exists():
        parts.append(SYSTEM_BUNDLE.read_text())
    if settings.upstream_ca is not None:
        parts.append(settings.upstream_ca.read_text())
    out = settings.egress_dir / "upstream-ca.pem"
    out.write_text("\n".join(parts))
    return out


def caps_of(settings: Settings) -> Caps:
    return Caps(
        per_vm=settings.egress_max_conns_per_vm,
        per_owner=settings.egress_max_conns_per_owner,
        total=settings.egress_max_conns,
    )


def size_open_files_limit(needed: int) -> int:
    """The proxy holds two descriptors per connection: make the limit what the connection caps need (the
    hard limit too, as root), never lower than it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, needed)
    if hard != resource.RLIM_INFINITY and hard < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        target = hard
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run(settings: Settings, ready_file: Path | None = None) -> None:
    plan = net_plan(settings)
    wanted = caps_of(settings)
    limit = size_open_files_limit(wanted.fd_limit())
    caps = wanted.within(limit)
    if caps != wanted:
        log.warning(
            "egress: %d open files allowed (the caps need %d): connections capped at %s instead",
            limit,
            wanted.fd_limit(),
            caps,
        )
    log.info("egress: up to %d open files; open connections at most %s", limit, caps)
    if plan is None:
        raise SystemExit("the sandbox network is turned off (CORRAL_NETWORK=off): no egress to run")
    (settings.egress_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    host = HostCalls(host_netns_fd())  # the store is reached from the host's network namespace
    engine = make_engine(settings.database_url)
    sessions = session_factory(engine)
    cipher = AesGcmCipher(load_or_create_key(settings.secret_key_file))
    watcher = StateWatcher.from_store(sessions, cipher, call=host.call)

    def write_now(events: Sequence[NewEvent]) -> None:
        with sessions() as session:
            audit.record(session, events)
            session.commit()

    def write(events: Sequence[NewEvent]) -> None:
        host.call(lambda: write_now(events))

    def bad_event(exc: Exception) -> bool:
        """The store refused the data (not a connection problem)."""
        return isinstance(exc, ValueError | DataError | IntegrityError) or (
            isinstance(exc, StatementError) and not isinstance(exc, OperationalError | InterfaceError)
        )

    writer = AuditWriter(write, is_bad_event=bad_event)
    watcher.start()
    writer.start()
    try:
        asyncio.run(_serve(settings, plan, watcher, writer, ready_file, caps))
    finally:
        writer.stop()
        watcher.stop()
        host.call(engine.dispose)
        host.close()


def health_line(watcher: StateWatcher) -> str:
    """What the proxy answers the supervisor's probe: ``ok`` or ``stale`` (no policy read for a while)."""
    age = watcher.age()
    state = "ok" if age <= POLICY_STALE else "stale"
    return f"{state} policy_age={age:.1f}" if age != float("inf") else f"{state} policy_age=never"


_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def quiet_resource_errors(
    existing: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None,
    throttle: Throttle,
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An event-loop exception handler that reports running out of descriptors (asyncio's ``accept`` retries
    after a second, up to a hundred times a round) once per interval, with a count, and no traceback; every
    other error goes to ``existing`` (mitmproxy's handler) as before."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRORS:
            held = throttle.due(exc.errno)
            if held is not None:
                log.error(
                    "egress: out of resources (%s) in %s; accepting again in a second%s",
                    errno.errorcode.get(exc.errno or 0, exc.errno),
                    context.get("message", "the event loop"),
                    held_note(held),
                )
            return
        if existing is not None:
            existing(loop, context)
        else:
            loop.default_exception_handler(context)

    return handler


async def _serve(
    settings: Settings,
    plan: NetPlan,
    watcher: StateWatcher,
    writer: AuditWriter,
    ready_file: Path | None,
    caps: Caps,
) -> None:
    from mitmproxy import options
    from mitmproxy.addons import core, disable_h2c, proxyserver, tlsconfig
    from mitmproxy.master import Master

    index = SandboxIndex(plan, watcher)
    resolver = Resolver(Upstream(plan.upstream_dns))
    memory = NameMemory()
    forbidden = Forbidden.of(plan.sandbox_subnet, plan.uplink_subnet, *settings.egress_deny_cidrs)

    def dns_denied(vm: VmEntry, name: str, decision: Decision) -> None:
        writer.add(audit_event(vm, "dns", decision, name, None, datetime.now(UTC)))

    dns = DnsService(resolver, memory, index.entry, dns_denied)
    stop_dns = await serve(dns, "0.0.0.0", plan.dns_port)  # noqa: S104 -- inside the gateway namespace

    opts = options.Options(confdir=str(settings.egress_dir))
    master = Master(opts, event_loop=asyncio.get_running_loop(), with_termlog=False)
    addon = EgressAddon(
        identify=index.entry,
        resolver=resolver,
        memory=memory,
        forbidden=forbidden,
        audit=writer.add,
        now=lambda: datetime.now(UTC),
        caps=caps,
        first_byte_timeout=settings.egress_first_byte_timeout_s,
        health=lambda: health_line(watcher),
    )
    server = proxyserver.Proxyserver()  # type: ignore[no-untyped-call]
    master.addons.add(  # type: ignore[no-untyped-call]
        addon,
        core.Core(),
        server,
        TopLevelOnly(),
        tlsconfig.TlsConfig(),
        disable_h2c.DisableH2C(),
    )
    # options the addons define exist only once they are added
    opts.update(  # type: ignore[no-untyped-call]
        mode=[f"transparent@{plan.proxy_port}"],
        connection_strategy="lazy",
        ssl_verify_upstream_trusted_ca=str(upstream_bundle(settings)),
        http2=True,
        stream_large_bodies="256k",
        rawtcp=True,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.shutdown)

    async def announce() -> None:
        # mitmproxy installs its handler when it runs: ours goes in front of it
        await asyncio.sleep(0)
        loop.set_exception_handler(quiet_resource_errors(loop.get_exception_handler(), Throttle(10.0)))
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", plan.proxy_port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        if ready_file is not None:
            await asyncio.to_thread(ready_file.write_text, "ready\n")
        log.info("egress: proxy on :%d, resolver on :%d", plan.proxy_port, plan.dns_port)

    async def forget_gone_vms() -> None:
        while True:
            await asyncio.sleep(60)
            memory.forget(set(watcher.current.vms))

    async def close_undecided() -> None:
        """Connections that stay silent (or never complete their first bytes) are closed after the
        first-byte timeout: they hold descriptors every sandbox shares."""
        every = min(1.0, max(0.1, settings.egress_first_byte_timeout_s / 4))
        while True:
            await asyncio.sleep(every)
            closed = sum(close_client(server, cid) for cid in addon.undecided_expired())
            if closed:
                addon.expired += closed
                log.info(
                    "egress: %d silent connections closed after %.0f s", closed, addon.first_byte_timeout
                )

    tasks = [
        asyncio.ensure_future(announce()),
        asyncio.ensure_future(forget_gone_vms()),
        asyncio.ensure_future(close_undecided()),
    ]
    try:
        await master.run()
    finally:
        for task in tasks:
            task.cancel()
        stop_dns()


def close_client(server: Any, client_id: str) -> bool:
    """Close one client connection of mitmproxy's proxy server (as its inactivity timeout does)."""
    handler = server.connections.get(client_id)
    if handler is None:
        return False
    io = handler.transports.get(handler.client)
    if io is None or io.handler is None:
        return False
    io.handler.cancel("first-byte timeout")
    return True
