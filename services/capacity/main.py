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
from services.common.run import cancel_and_wait

log = logging.getLogger(__name__)


def settings_from(cfg: CapacityConfig) -> CapacitySettings:
    return CapacitySettings(
        override=cfg.override,
        slots_per_worker=cfg.slots_per_worker,
        legacy_max_concurrent_requests=cfg.legacy_max_concurrent_requests,
        model_overrides=dict(cfg.model_overrides),
    )


class RunningCapacity:
    def __init__(self, service: CapacityService, http: HttpServer) -> None:
        self.service = service
        self.http = http


async def serve(
    cfg: CapacityConfig,
    stop: asyncio.Event,
    started: asyncio.Future[RunningCapacity] | None = None,
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
        await service.follower.start()
        await bus.subscribe(
            subjects.capacity_snapshot, queue="capacity", cb=service.on_snapshot_request
        )
        await bus.flush()

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
        async with asyncio.TaskGroup() as tg:
            follower = tg.create_task(service.supervise())
            http_task = tg.create_task(http.serve())
            if started is not None:
                started.set_result(RunningCapacity(service, http))
            await stop.wait()
            await cancel_and_wait(follower)
            http.stop()
            await http_task
    finally:
        await bus.close()
