"""Worker process wiring: engines, admission gates, HTTP API, bus lifecycle; drains on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from schemas.registry import WorkerStatus
from schemas.subjects import Subjects
from services.admission.core import AdmissionLimits
from services.admission.gate import Gate
from services.common.bus import Bus
from services.common.http import HttpServer
from services.common.http_limits import HttpLimits
from services.common.metrics import new_registry
from services.common.ports import serving_socket
from services.common.run import Running, Tasks, run_until_stopped
from services.worker.config import WorkerConfig
from services.worker.engines.base import Engine
from services.worker.engines.select import build_engines
from services.worker.http import WorkerApi, create_app
from services.worker.metrics import WorkerMetrics
from services.worker.served import ServedModel, prefix_caches
from services.worker.shell import KvEvents, Lifecycle

log = logging.getLogger(__name__)


class WorkerService:
    """A started worker as tests, benchmarks and `up` hold it (in a Running): where it answers,
    what it serves, and its lifecycle in the fleet (None: a plain OpenAI server, unregistered);
    kv: its prefix caches' events (None: unregistered, or no engine here keeps a prefix cache)."""

    def __init__(
        self,
        url: str,
        models: dict[str, ServedModel],
        lifecycle: Lifecycle | None,
        kv: KvEvents | None = None,
    ) -> None:
        self.url, self.models, self.lifecycle, self.kv = url, models, lifecycle, kv

    @property
    def worker_id(self) -> str | None:
        return None if self.lifecycle is None else self.lifecycle.worker_id

    @property
    def status(self) -> WorkerStatus:
        return WorkerStatus.READY if self.lifecycle is None else self.lifecycle.status

    async def start(self, tasks: Tasks) -> None:
        """Registered (Pending), then Ready on the first heartbeat; then heartbeats and re-checks
        in the background. HTTP already accepts: the registry may send traffic at once."""
        if self.lifecycle is not None:
            await self.lifecycle.register()
            await self.lifecycle.publish_load()  # Ready as soon as the registry hears from us
            tasks.spawn(self.lifecycle.heartbeats())
            tasks.spawn(self.lifecycle.stay_registered())
            if self.kv is not None:
                tasks.spawn(self.kv.run())
        log.info("worker serving", extra={"url": self.url, "models": sorted(self.models)})

    async def drain(self, timeout_s: float) -> None:
        """Refuse newcomers, let the running finish, deregister (when registered)."""
        log.info("draining")
        if self.lifecycle is not None:
            await self.lifecycle.drain(timeout_s)
        else:
            for served in self.models.values():
                served.gate.drain()


def serve_models(
    cfg: WorkerConfig,
    engines: list[Engine],
    metrics: WorkerMetrics,
    on_change: list[Callable[[], None]],
) -> dict[str, ServedModel]:
    """Each engine behind its gate; a gate's in-flight or queue change updates the gauges and
    calls on_change (the lifecycle's heartbeat, once registered)."""
    models: dict[str, ServedModel] = {}
    for engine in engines:
        limits = AdmissionLimits(
            max_in_flight=cfg.max_in_flight or engine.limits.max_batch,
            max_queue_depth=cfg.max_queue_depth,
            max_wait_s=cfg.max_wait_s,
        )
        name = engine.model_id

        def load_moved(name: str = name) -> None:
            core = models[name].gate.core
            metrics.in_flight.labels(name).set(core.in_flight)
            metrics.queue_depth.labels(name).set(core.queue_depth)
            for hook in on_change:
                hook()

        models[name] = ServedModel(engine, Gate(limits, on_change=load_moved))
    return models


def kv_events(cfg: WorkerConfig, bus: Bus, lifecycle: Lifecycle) -> KvEvents | None:
    """The publisher of the prefix caches' events; None when no engine here keeps one."""
    caches = prefix_caches(lifecycle.models)
    if not caches:
        return None
    return KvEvents(
        bus,
        lifecycle.subjects,
        lifecycle.principal,
        caches,
        worker_id=lambda: lifecycle.worker_id,
        snapshot_interval_s=cfg.kv_snapshot_interval_s,
    )


async def serve(
    cfg: WorkerConfig,
    stop: asyncio.Event,
    started: asyncio.Future[Running[WorkerService]] | None = None,
) -> None:
    engines = await build_engines(cfg)
    registry = new_registry()
    metrics = WorkerMetrics(registry)
    hooks: list[Callable[[], None]] = []
    models = serve_models(cfg, engines, metrics, hooks)
    sock = serving_socket(cfg.listen_fd, cfg.http_host, cfg.http_port)
    url = cfg.advertise_url or f"http://{cfg.http_host}:{sock.getsockname()[1]}"
    bus: Bus | None = None
    try:
        lifecycle: Lifecycle | None = None
        kv: KvEvents | None = None
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
                check_interval_s=cfg.registry_check_interval_s,
                registry_timeout_s=cfg.registry_timeout_s,
            )
            hooks.append(lifecycle.dirty.set)
            kv = kv_events(cfg, bus, lifecycle)
        worker = WorkerService(url, models, lifecycle, kv)

        def health() -> dict[str, object]:
            return {
                "ok": True,
                "instance": cfg.instance,
                "status": worker.status.value,
                "url": url,
                "models": sorted(models),
                "worker_id": worker.worker_id,
            }

        api = WorkerApi(
            models,
            metrics,
            body_limit=cfg.request_body_limit,
            default_max_tokens=cfg.default_max_tokens,
            max_n=cfg.max_n,
        )
        http = HttpServer(
            create_app(api, registry, health),
            sock,
            keep_alive_s=cfg.keep_alive_s,
            limits=HttpLimits.of(cfg),
        )

        async def start(tasks: Tasks) -> None:
            await http.wait_started()
            await worker.start(tasks)
            if started is not None:
                started.set_result(Running(worker, http))

        async def drain() -> None:
            await worker.drain(cfg.drain_timeout_s)

        await run_until_stopped(http, stop, start, drain)
    finally:
        for engine in engines:
            await engine.close()
        if bus is not None:
            await bus.close()
