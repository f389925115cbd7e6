"""Worker process wiring: engines, admission gates, HTTP API, bus lifecycle; drains on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from schemas.subjects import Subjects
from services.admission.core import AdmissionLimits
from services.admission.gate import Gate
from services.common.bus import Bus
from services.common.http import HttpServer
from services.common.http_limits import HttpLimits
from services.common.metrics import new_registry
from services.common.ports import serving_socket
from services.common.run import cancel_and_wait
from services.worker.config import WorkerConfig
from services.worker.engines.base import Engine
from services.worker.engines.select import build_engines
from services.worker.http import ServedModel, WorkerApi, create_app
from services.worker.metrics import WorkerMetrics
from services.worker.shell import Lifecycle

log = logging.getLogger(__name__)


class RunningWorker:
    def __init__(
        self,
        url: str,
        http: HttpServer,
        models: dict[str, ServedModel],
        lifecycle: Lifecycle | None,
    ) -> None:
        self.url, self.http, self.models, self.lifecycle = url, http, models, lifecycle

    @property
    def worker_id(self) -> str | None:
        return None if self.lifecycle is None else self.lifecycle.worker_id


def serve_models(
    cfg: WorkerConfig,
    engines: list[Engine],
    metrics: WorkerMetrics,
    on_change: list[Callable[[], None]],
) -> dict[str, ServedModel]:
    models: dict[str, ServedModel] = {}
    for engine in engines:
        limits = AdmissionLimits(
            max_in_flight=cfg.max_in_flight or engine.limits.max_batch,
            max_queue_depth=cfg.max_queue_depth,
            max_wait_s=cfg.max_wait_s,
        )
        name = engine.model_id

        def changed(name: str = name) -> None:
            core = models[name].gate.core
            metrics.in_flight.labels(name).set(core.in_flight)
            metrics.queue_depth.labels(name).set(core.queue_depth)
            for hook in on_change:
                hook()

        models[name] = ServedModel(engine, Gate(limits, on_change=changed))
    return models


async def serve(
    cfg: WorkerConfig, stop: asyncio.Event, started: asyncio.Future[RunningWorker] | None = None
) -> None:
    engines = await build_engines(cfg)
    registry = new_registry()
    metrics = WorkerMetrics(registry)
    hooks: list[Callable[[], None]] = []
    models = serve_models(cfg, engines, metrics, hooks)
    sock = serving_socket(cfg.listen_fd, cfg.http_host, cfg.http_port)
    url = cfg.advertise_url or f"http://{cfg.http_host}:{sock.getsockname()[1]}"
    lifecycle: Lifecycle | None = None
    bus: Bus | None = None

    def health() -> dict[str, object]:
        status = "ready" if lifecycle is None else lifecycle.status.value
        return {
            "ok": True,
            "instance": cfg.instance,
            "status": status,
            "url": url,
            "models": sorted(models),
            "worker_id": None if lifecycle is None else lifecycle.worker_id,
        }

    api = WorkerApi(
        models,
        metrics,
        body_limit=cfg.request_body_limit,
        default_max_tokens=cfg.default_max_tokens,
    )
    http = HttpServer(
        create_app(api, registry, health),
        sock,
        keep_alive_s=cfg.keep_alive_s,
        limits=HttpLimits.of(cfg),
    )
    try:
        if cfg.register:
            bus = await Bus.connect(
                cfg.nats_url, "worker", first_connect_s=cfg.nats_connect_timeout_s
            )
            lifecycle = Lifecycle(
                bus,
                Subjects.for_prefix(cfg.subject_prefix),
                url,
                models,
                labels=cfg.labels,
                heartbeat_interval_s=cfg.heartbeat_interval_s,
                principal=cfg.worker_principal,
            )
            hooks.append(lifecycle.dirty.set)
        async with asyncio.TaskGroup() as tg:
            http_task = tg.create_task(http.serve())
            while not http.started:  # noqa: ASYNC110 - uvicorn exposes only a flag
                await asyncio.sleep(0.01)
            loops = []
            if lifecycle is not None:
                await lifecycle.register()
                await lifecycle.publish_load()  # Ready as soon as the registry hears from us
                loops = [
                    tg.create_task(lifecycle.heartbeats()),
                    tg.create_task(lifecycle.stay_registered()),
                ]
            log.info("worker serving", extra={"url": url, "models": sorted(models)})
            if started is not None:
                started.set_result(RunningWorker(url, http, models, lifecycle))
            await stop.wait()
            log.info("draining")
            if lifecycle is not None:
                await lifecycle.drain(cfg.drain_timeout_s)
            else:
                for served in models.values():
                    served.gate.drain()
            await cancel_and_wait(*loops)
            http.stop()
            await http_task
    finally:
        for engine in engines:
            await engine.close()
        if bus is not None:
            await bus.close()
