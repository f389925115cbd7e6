"""Test-side fleet helpers: run the capacity service in-process, play a worker's heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from schemas import codec
from schemas.base import Envelope
from schemas.capacity import CapacityView
from schemas.load import ModelLoad, WorkerLoad
from schemas.registry import WorkerRecord, WorkerStatus
from schemas.subjects import Subjects
from services.capacity.config import CapacityConfig
from services.capacity.main import serve
from services.capacity.shell import CapacityService
from services.common.bus import Bus, Message
from services.common.run import Running, in_process
from services.common.seq import Sequencer
from services.worker.config import DEFAULT_PRINCIPAL
from tests.helpers import eventually


@contextlib.asynccontextmanager
async def running_capacity(
    nats_url: str, prefix: str, **overrides: Any
) -> AsyncIterator[Running[CapacityService]]:
    cfg = CapacityConfig(nats_url=nats_url, subject_prefix=prefix, http_port=0, **overrides)
    async with in_process(serve, cfg) as cap:
        yield cap


# The principal a test plays a worker as: records it registers through
# RegistryClient(..., principal=FAKE_WORKER) are its own, so their heartbeats count.
FAKE_WORKER = "fake-worker"


class Heartbeats:
    """Publishes a worker's load heartbeats (as a worker process would: as the principal that
    owns the record) until stopped."""

    def __init__(
        self, bus: Bus, prefix: str, record: WorkerRecord, interval_s: float = 0.2
    ) -> None:
        self.bus, self.record, self.interval_s = bus, record, interval_s
        self.subject = Subjects.for_prefix(prefix).load(record.owner or FAKE_WORKER, record.id)
        self.sequencer = Sequencer(record.id, epoch=time.time_ns())
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Heartbeats:
        self.task = asyncio.create_task(self._run())
        return self

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        while True:
            load = WorkerLoad(
                worker_id=self.record.id,
                url=self.record.url,
                status=WorkerStatus.READY,
                models=tuple(
                    ModelLoad(id=m, in_flight=0, queue_depth=0, max_in_flight=4, max_queue_depth=8)
                    for m in self.record.models
                ),
            )
            await self.bus.publish(
                self.subject, codec.encode(self.sequencer.stamp(load, time.time()))
            )
            await asyncio.sleep(self.interval_s)


class ViewLog:
    """Every capacity view published."""

    def __init__(self) -> None:
        self.views: list[Envelope[CapacityView]] = []

    async def on_msg(self, msg: Message) -> None:
        self.views.append(codec.capacity_view_decoder.decode(msg.data))

    @property
    def last(self) -> CapacityView | None:
        return self.views[-1].body if self.views else None

    def fleet(self) -> tuple[int, str] | None:
        last = self.last
        return None if last is None else (last.fleet.capacity, last.fleet.source.value)


async def record_views(bus: Bus, prefix: str) -> ViewLog:
    log = ViewLog()
    await bus.subscribe(Subjects.for_prefix(prefix).capacity_view, cb=log.on_msg)
    await bus.flush()
    return log


@contextlib.asynccontextmanager
async def running_worker(nats_url: str, prefix: str, **overrides: Any) -> AsyncIterator[Any]:
    """A worker in-process (sim engine unless overridden); yields a Running[WorkerService]."""
    from services.worker.config import WorkerConfig
    from services.worker.main import serve as serve_worker

    fields: dict[str, Any] = {"engine": "sim", "http_port": 0, "heartbeat_interval_s": 0.2}
    cfg = WorkerConfig(nats_url=nats_url, subject_prefix=prefix, **(fields | overrides))
    async with in_process(serve_worker, cfg) as worker:
        yield worker


@contextlib.asynccontextmanager
async def running_router(nats_url: str, prefix: str, **overrides: Any) -> AsyncIterator[Any]:
    """A router in-process on a free port; yields a Running[RouterShell] (services.router.main)."""
    from services.router.config import RouterConfig
    from services.router.main import serve as serve_router

    fields: dict[str, Any] = {"http_port": 0, "reuse_port": False}
    cfg = RouterConfig(nats_url=nats_url, subject_prefix=prefix, **(fields | overrides))
    async with in_process(serve_router, cfg) as router:
        yield router


async def spawn_worker(
    nats_url: str, prefix: str, port: int, *flags: str
) -> asyncio.subprocess.Process:
    """A sim worker as a real process (for SIGTERM / SIGKILL tests); flags are worker flags."""
    import os
    import sys

    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.worker",
        "--engine",
        "sim",
        "--http-port",
        str(port),
        "--nats-url",
        nats_url,
        "--subject-prefix",
        prefix,
        *flags,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


@contextlib.asynccontextmanager
async def fleet(
    nats_url: str, prefix: str, workers: list[dict[str, Any]], **router: Any
) -> AsyncIterator[Any]:
    """Registry, capacity, in-process sim workers and a router, yielded once the router sees
    every worker Ready with a fresh heartbeat. router["registry"] / router["capacity"] hold
    those services' overrides; the rest configure the router."""
    from tests.helpers import eventually
    from tests.integration.registry_fixtures import running_registry

    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            running_registry(nats_url, prefix, **router.pop("registry", {}))
        )
        await stack.enter_async_context(
            running_capacity(nats_url, prefix, **router.pop("capacity", {}))
        )
        ws = [
            await stack.enter_async_context(running_worker(nats_url, prefix, **w)) for w in workers
        ]
        r = await stack.enter_async_context(running_router(nats_url, prefix, **router))
        await eventually(
            lambda: all(
                r.service.view.is_fresh(w.service.worker_id, r.service.clock())
                and r.service.view.records.get(w.service.worker_id) is not None
                and r.service.view.records[w.service.worker_id].status == WorkerStatus.READY
                for w in ws
            ),
            timeout_s=10,
        )
        yield r, ws


class Claims:
    """Heartbeats the test publishes for a real worker, as its owner would, under a newer epoch
    than the worker's own: the router believes these (and ignores the worker's) until the end."""

    def __init__(self, bus: Bus, prefix: str, worker: Any, router: Any) -> None:
        self.bus, self.worker, self.router = bus, worker, router
        worker_id = worker.service.worker_id
        self.subject = Subjects.for_prefix(prefix).load(DEFAULT_PRINCIPAL, worker_id)
        self.sequencer = Sequencer(worker_id, epoch=time.time_ns())

    async def load(self, in_flight: int = 0, max_in_flight: int = 1, **model: Any) -> None:
        """Publish one; returns once the router holds it."""
        fields: dict[str, Any] = {"queue_depth": 0, "max_queue_depth": 0} | model
        worker_id = self.worker.service.worker_id
        load = WorkerLoad(
            worker_id=worker_id,
            url=self.worker.url,
            status=WorkerStatus.READY,
            models=(
                ModelLoad(
                    id="sim-model", in_flight=in_flight, max_in_flight=max_in_flight, **fields
                ),
            ),
            heartbeat_interval_s=60.0,  # fresh for the whole test
        )
        env = self.sequencer.stamp(load, time.time())
        await self.bus.publish(self.subject, codec.encode(env))
        beats = self.router.service.view.beats
        await eventually(
            lambda: (
                worker_id in beats
                and (beats[worker_id].epoch, beats[worker_id].seq) == (env.epoch, env.seq)
            )
        )
