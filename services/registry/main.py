"""Registry process wiring: NATS, KV store, subscriptions, loops, admin HTTP; drains on stop."""

from __future__ import annotations

import asyncio
import logging

from schemas.subjects import Subjects
from services.common.bus import Bus
from services.common.http import HttpServer
from services.common.http_limits import HttpLimits
from services.common.metrics import new_registry
from services.common.ports import serving_socket
from services.common.run import Running, Tasks, every, run_until_stopped
from services.registry.config import RegistryConfig
from services.registry.http import create_app
from services.registry.nats_edge import NatsEdge
from services.registry.shell import Registry, RegistryMetrics
from services.registry.store import RegistryStore

log = logging.getLogger(__name__)


async def serve(
    cfg: RegistryConfig,
    stop: asyncio.Event,
    started: asyncio.Future[Running[Registry]] | None = None,
) -> None:
    subjects = Subjects.for_prefix(cfg.subject_prefix)
    metrics_registry = new_registry()
    bus = await Bus.connect(cfg.nats_url, "registry", first_connect_s=cfg.nats_connect_timeout_s)
    try:
        store = await RegistryStore.open(
            bus, subjects.kv_bucket(cfg.kv_bucket), replicas=cfg.kv_replicas
        )
        service = Registry(bus, store, subjects, RegistryMetrics(metrics_registry))
        await service.start()
        edge = NatsEdge(service)
        # Queue groups: with two registries, each command is handled once (KV CAS keeps it safe).
        await bus.subscribe(subjects.registry_cmd_all, queue="registry", cb=edge.on_command)
        await bus.subscribe(subjects.worker_cmd_all, queue="registry", cb=edge.on_worker_command)
        await bus.subscribe(subjects.registry_snapshot, queue="registry", cb=edge.on_snapshot)
        await bus.subscribe(subjects.load_all, cb=edge.on_load)
        await bus.flush()  # the server knows our subscriptions before anyone is told we are up

        def health() -> dict[str, object]:
            seqr = service.sequencer
            workers = len(service.book.records)
            return {
                "ok": bus.connected,
                "instance": cfg.instance,
                "epoch": seqr.epoch,
                "seq": seqr.seq,
                "workers": workers,
            }

        if not cfg.admin_token:
            log.warning(
                "admin API has no token: open to anyone on %s (development only)", cfg.http_host
            )
        app = create_app(
            service.dispatch,
            admin_token=cfg.admin_token,
            metrics_registry=metrics_registry,
            health=health,
            body_limit=cfg.request_body_limit,
        )
        http = HttpServer(
            app,
            serving_socket(cfg.listen_fd, cfg.http_host, cfg.http_port),
            limits=HttpLimits.of(cfg),
        )

        async def start(tasks: Tasks) -> None:
            tasks.spawn(every(cfg.beacon_interval_s, service.beacon, "beacon"))
            expiry_interval_s = max(cfg.heartbeat_ttl_s / 4, 0.05)
            tasks.spawn(
                every(expiry_interval_s, lambda: service.expire(cfg.heartbeat_ttl_s), "expiry")
            )
            log.info("registry serving", extra={"port": http.port, "prefix": cfg.subject_prefix})
            if started is not None:
                started.set_result(Running(service, http))

        await run_until_stopped(http, stop, start)
    finally:
        await bus.close()
