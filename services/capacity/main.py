"""Capacity process wiring: NATS, KV for the latest view, follower, /metrics and /healthz."""

from __future__ import annotations

import asyncio
import logging

from schemas.subjects import Subjects
from services.capacity.config import CapacityConfig
from services.capacity.core import CapacitySettings
from services.capacity.shell import CapacityMetrics, CapacityService
from services.common.bus import Bus
from services.common.http import HttpServer, ops_app
from services.common.http_limits import HttpLimits
from services.common.metrics import new_registry
from services.common.ports import serving_socket
from services.common.run import Running, Tasks, run_until_stopped

log = logging.getLogger(__name__)


def settings_from(cfg: CapacityConfig) -> CapacitySettings:
    return CapacitySettings(
        override=cfg.override,
        slots_per_worker=cfg.slots_per_worker,
        legacy_max_concurrent_requests=cfg.legacy_max_concurrent_requests,
        model_overrides=dict(cfg.model_overrides),
    )


async def serve(
    cfg: CapacityConfig,
    stop: asyncio.Event,
    started: asyncio.Future[Running[CapacityService]] | None = None,
) -> None:
    subjects = Subjects.for_prefix(cfg.subject_prefix)
    registry = new_registry()
    bus = await Bus.connect(cfg.nats_url, "capacity", first_connect_s=cfg.nats_connect_timeout_s)
    try:
        kv = await bus.key_value(subjects.kv_bucket(cfg.kv_bucket), replicas=cfg.kv_replicas)
        service = CapacityService(
            bus,
            kv,
            subjects,
            settings_from(cfg),
            CapacityMetrics(registry),
            checkpoint_interval_s=cfg.checkpoint_interval_s,
            snapshot_timeout_s=cfg.snapshot_timeout_s,
        )
        await service.start()

        def health() -> dict[str, object]:
            view = service.view
            return {
                "ok": bus.connected and service.follower.synced.is_set(),
                "instance": cfg.instance,
                "fleet_capacity": None if view is None else view.fleet.capacity,
                "registry_seq": service.follower.mirror.position[1],
            }

        sock = serving_socket(cfg.listen_fd, cfg.http_host, cfg.http_port)
        http = HttpServer(ops_app(registry, health), sock, limits=HttpLimits.of(cfg))

        async def start(tasks: Tasks) -> None:
            # Ready without a registry: until one answers, the follower retries and readers wait.
            tasks.spawn(service.supervise())
            if started is not None:
                started.set_result(Running(service, http))

        await run_until_stopped(http, stop, start)
    finally:
        await bus.close()
