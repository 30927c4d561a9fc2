"""``corral egress``: the egress process, run inside the gateway namespace (``corral serve`` starts it with
``ip netns exec``, which also mounts the namespace's own /sys). It serves the transparent proxy and the
resolver on the gateway, reads policy and secrets from the store, and writes audit events to it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError, StatementError

from corral.config import Settings
from corral.domain.egress_policy import Decision, Forbidden
from corral.egress.addon import EgressAddon, TopLevelOnly, audit_event
from corral.egress.auditlog import AuditWriter
from corral.egress.dns import DnsService, NameMemory, Resolver, Upstream, serve
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


def raise_open_files_limit() -> int:
    """The proxy holds two descriptors per connection of every sandbox: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run(settings: Settings, ready_file: Path | None = None) -> None:
    plan = net_plan(settings)
    log.info("egress: up to %d open files", raise_open_files_limit())
    if plan is None:
        raise SystemExit("the sandbox network is turned off (CORRAL_NETWORK=off): no egress to run")
    (settings.egress_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    engine = make_engine(settings.database_url)
    sessions = session_factory(engine)
    cipher = AesGcmCipher(load_or_create_key(settings.secret_key_file))
    watcher = StateWatcher.from_store(sessions, cipher)

    def write(events: Sequence[NewEvent]) -> None:
        with sessions() as session:
            audit.record(session, events)
            session.commit()

    def bad_event(exc: Exception) -> bool:
        """The store refused the data (not a connection problem)."""
        return isinstance(exc, ValueError | DataError | IntegrityError) or (
            isinstance(exc, StatementError) and not isinstance(exc, OperationalError | InterfaceError)
        )

    writer = AuditWriter(write, is_bad_event=bad_event)
    watcher.start()
    writer.start()
    try:
        asyncio.run(_serve(settings, plan, watcher, writer, ready_file))
    finally:
        writer.stop()
        watcher.stop()
        engine.dispose()


async def _serve(
    settings: Settings, plan: NetPlan, watcher: StateWatcher, writer: AuditWriter, ready_file: Path | None
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
    )
    master.addons.add(  # type: ignore[no-untyped-call]
        addon,
        core.Core(),
        proxyserver.Proxyserver(),  # type: ignore[no-untyped-call]
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

    tasks = [asyncio.ensure_future(announce()), asyncio.ensure_future(forget_gone_vms())]
    try:
        await master.run()
    finally:
        for task in tasks:
            task.cancel()
        stop_dns()
