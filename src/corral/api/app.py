"""The application factory: wires settings, store, services and routers into one FastAPI app."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from corral import __version__
from corral.api import docs, errors, openapi
from corral.api.bulkheads import Bulkheads, ssh_limits
from corral.api.deps import AppState
from corral.api.idempotency import Idempotency
from corral.api.limits import RequestGuard
from corral.api.routers import (
    access,
    api_keys,
    audit,
    auth,
    egress,
    env,
    execs,
    files,
    health,
    node,
    proxy,
    secrets,
    state,
    usage,
    users,
    vms,
)
from corral.config import Settings, prepare_data_dir
from corral.domain.clock import Clock, SystemClock
from corral.domain.ratelimit import Limit, RateLimiter
from corral.egress.supervisor import EgressSupervisor
from corral.node import executors
from corral.node.setup import admit_creates, ensure_default_image, make_node
from corral.node.snapstore import LocalSnapshotStore
from corral.runtime.images import Progress
from corral.security.secretbox import AesGcmCipher, load_or_create_key
from corral.services.access import Access
from corral.services.context import Services
from corral.services.lifecycle import Lifecycle
from corral.services.state import StateService
from corral.services.vms import ResourceLimits
from corral.ssh.gateway import SshGateway, load_or_create_host_key
from corral.ssh.sftp import SandboxSFTP
from corral.store.db import make_engine, migrate, read_session_factory, session_factory

log = logging.getLogger("corral")

DESCRIPTION = """\
Corral runs AI agents and untrusted code in sandboxes on your own machines, with each sandbox's network,
credentials and spending under its owner's control.

Authenticate with `Authorization: Bearer <api_key>` (get a key from `POST /v1/users` or `corral login`).
Lists return `{"data", "has_more", "cursor"}`: pass `cursor` back to get the next page.
Errors return `{"error": {"code", "message"}}`. Timestamps are ISO 8601 UTC.
"""


def make_lifecycle(
    settings: Settings,
    sessions: sessionmaker[Session],
    reads: sessionmaker[Session],
    clock: Clock,
    progress: Progress | None,
) -> tuple[Lifecycle, StateService]:
    """The node on this host, made ready, its default image present, and reconciled with the store."""
    node = make_node(settings)
    node.prepare()
    image = ensure_default_image(node, progress)
    life = Lifecycle(
        sessions,
        clock,
        node,
        default_image=image.name,
        limits=ResourceLimits(
            max_vcpus=settings.max_vcpus, max_mem_mib=settings.max_mem_mib, max_disk_mib=settings.max_disk_mib
        ),
        pool_size=settings.warm_pool_size,
        reads=reads,
        usage_interval_s=settings.usage_interval_s,
    )
    saved = StateService(life, LocalSnapshotStore(settings.snapshots_path))
    life.saved_state = saved
    admit_creates(life, settings)
    life.on_destroy = saved.forget_vm
    result = life.reconcile()
    saved.reconcile()
    log.info(
        "reconciled: %d VMs adopted, %d failed, %d operations finished, %d orphans removed",
        result.adopted,
        result.failed,
        result.finished,
        result.orphans_removed,
    )
    return life, saved


def create_app(
    settings: Settings | None = None, *, clock: Clock | None = None, progress: Progress | None = None
) -> FastAPI:
    settings = settings or Settings.from_env()
    clock = clock or SystemClock()
    prepare_data_dir(settings.data_dir)
    engine = make_engine(settings.database_url)
    migrate(engine)
    cipher = AesGcmCipher(load_or_create_key(settings.secret_key_file))
    sessions = session_factory(engine)
    reads = read_session_factory(engine)
    life, saved = (
        make_lifecycle(settings, sessions, reads, clock, progress) if settings.node else (None, None)
    )
    egress_process = (
        EgressSupervisor(settings, settings.gateway_netns) if life is not None and settings.network else None
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Sync endpoints run in threads; a long exec or a streamed file holds one for its whole duration.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.max_concurrent_requests
        if egress_process is not None:
            await anyio.to_thread.run_sync(egress_process.start)
            app.state.corral.egress = egress_process  # its probes are parts of /readyz
        if life is not None:
            life.start_background()
        if life is not None and settings.ssh:
            gateway = SshGateway(
                Access(life, reads).ssh_backend(),
                load_or_create_host_key(settings.data_dir),
                sftp=SandboxSFTP,
                limits=ssh_limits(app.state.corral.bulkheads, settings),
            )
            await gateway.start(settings.ssh_listen, settings.ssh_port)
            app.state.corral.ssh = gateway
        try:
            yield
        finally:
            if app.state.corral.ssh is not None:
                await app.state.corral.ssh.close()
                app.state.corral.ssh = None
            if life is not None:
                if life.saved_state is not None:
                    life.saved_state.close()
                life.close()
            if egress_process is not None:
                await anyio.to_thread.run_sync(egress_process.stop)

    app = FastAPI(
        lifespan=lifespan,
        title="Corral API",
        version=__version__,
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    if not executors.in_use(executors.EXEC_RUNTIME):  # every exec the caps let in has its thread
        executors.configure(executors.EXEC_RUNTIME, settings.max_execs)
    app.state.corral = AppState(
        settings=settings,
        engine=engine,
        sessions=sessions,
        services=Services(
            clock=clock, cipher=cipher, device_code_ttl_seconds=settings.device_code_ttl_seconds
        ),
        key_limiter=RateLimiter(Limit.per_minute(settings.rate_limit_per_minute, settings.rate_limit_burst)),
        anon_limiter=RateLimiter(
            Limit.per_minute(settings.anon_rate_limit_per_minute, settings.anon_rate_limit_burst)
        ),
        lifecycle=life,
        reads=reads,
        saved_state=saved,
        bulkheads=Bulkheads.from_settings(settings),
    )
    errors.install(app)
    docs.install(app)
    for module in (
        health,
        users,
        api_keys,
        auth,
        env,
        secrets,
        egress,
        audit,
        usage,
        vms,
        execs,
        files,
        state,
        access,
        proxy,
        node,
    ):
        app.include_router(module.router)
    app.include_router(vms.images_router)
    app.add_middleware(Idempotency)  # inside RequestGuard: bodies are capped before it reads them
    app.add_middleware(RequestGuard, max_bytes=settings.max_body_bytes)
    app.openapi = lambda: openapi.build(app)  # type: ignore[method-assign]
    return app
