"""Router process wiring: NATS followers, the upstream client (upstream.py), ingress; drains."""

from __future__ import annotations

import asyncio
import logging
import os

from schemas.subjects import Subjects
from services.common.bus import Bus
from services.common.http import HttpServer
from services.common.http_limits import HttpLimits
from services.common.metrics import new_registry
from services.common.ports import serving_socket
from services.common.run import Running, Tasks, run_until_stopped
from services.router.config import RouterConfig
from services.router.forward import Forwarder
from services.router.http import create_app
from services.router.metrics import RouterMetrics
from services.router.rules import PriorityCaps
from services.router.shell import RouterShell
from services.router.upstream import Upstream

log = logging.getLogger(__name__)


async def serve(
    cfg: RouterConfig,
    stop: asyncio.Event,
    started: asyncio.Future[Running[RouterShell]] | None = None,
) -> None:
    subjects = Subjects.for_prefix(cfg.subject_prefix)
    registry = new_registry()
    bus = await Bus.connect(cfg.nats_url, "router", first_connect_s=cfg.nats_connect_timeout_s)
    metrics = RouterMetrics(registry)
    # keepalive shorter than the worker's (config.py); TCP_NODELAY on its sockets.
    upstream = Upstream(
        connect_timeout_s=cfg.connect_timeout_s,
        header_timeout_s=cfg.header_timeout_s,
        keepalive_s=cfg.upstream_keepalive_s,
        max_connections=cfg.upstream_pool_size,
        on_resend=metrics.retries.labels("stale_connection").inc,
    )
    try:
        shell = RouterShell(
            bus,
            subjects,
            metrics,
            queue_depth=cfg.gateway_queue_depth,
            max_wait_s=cfg.gateway_max_wait_s,
            capacity_share=cfg.capacity_share,
            checkpoint_interval_s=cfg.checkpoint_interval_s,
            policy=cfg.policy,
        )
        await shell.start()
        forwarder = Forwarder(
            shell.view,
            shell.gateway,
            metrics,
            upstream,
            clock=shell.clock,
            max_attempts=cfg.max_attempts,
            retry_budget_ratio=cfg.retry_budget_ratio,
            body_read_timeout_s=cfg.body_read_timeout_s,
            targets=cfg.targets(),
            request_log_every=cfg.request_log_every,
        )

        def health() -> dict[str, object]:
            return {
                "ok": bus.connected,
                "instance": cfg.instance,
                "pid": os.getpid(),  # routers share one port: `up` tells them apart by it
                "registry_synced": shell.synced,
                "capacity_known": shell.gateway.capacity is not None,
                **shell.heard(),
            }

        app = create_app(
            shell,
            forwarder,
            api_keys=cfg.api_keys,
            body_limit=cfg.request_body_limit,
            metrics_registry=registry,
            health=health,
            dashboard_interval_s=cfg.dashboard_interval_s if cfg.dashboard else None,
            priority_caps=PriorityCaps(default=cfg.max_priority, per_key=cfg.key_max_priority),
        )
        sock = serving_socket(
            cfg.listen_fd, cfg.http_host, cfg.http_port, reuse_port=cfg.reuse_port
        )
        http = HttpServer(app, sock, limits=HttpLimits.of(cfg))

        async def start(tasks: Tasks) -> None:
            tasks.spawn(shell.follower.run())
            tasks.spawn(shell.gateway.fetch_capacity())
            await shell.follower.synced.wait()
            log.info("router serving", extra={"port": http.port})
            if started is not None:
                started.set_result(Running(shell, http))

        async def drain() -> None:
            shell.drain()  # new requests: 503; in-flight ones finish (uvicorn's graceful shutdown)

        await run_until_stopped(http, stop, start, drain)
    finally:
        upstream.close()
        await bus.close()
