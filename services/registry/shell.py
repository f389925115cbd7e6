"""Registry shell: serializes each change, persists it by CAS, publishes its events in seq order.

One asyncio lock orders all mutations in this process, so the publish order equals the seq order.
A CAS conflict (another registry process wrote first) reloads state from KV and retries once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas import codec
from schemas.load import WorkerLoad
from schemas.registry import (
    CommandError,
    CommandReply,
    GetRequest,
    ListRequest,
    RegisterRequest,
    RegistryBeacon,
    RegistrySnapshot,
    RemoveRequest,
    ReplaceRequest,
    SetStatusRequest,
    UpsertRequest,
    WorkerStatus,
)
from schemas.subjects import Subjects
from services.common.bus import Bus, Message, reply
from services.common.metrics import BusMetrics
from services.common.seq import Sequencer
from services.registry.core import Outcome, RegistryState
from services.registry.store import RegistryStore, StoreConflict, UrlTaken

log = logging.getLogger(__name__)

REQUEST_TYPES: dict[str, type[Any]] = {
    "register": RegisterRequest,
    "replace": ReplaceRequest,
    "upsert": UpsertRequest,
    "set_status": SetStatusRequest,
    "remove": RemoveRequest,
    "get": GetRequest,
    "list": ListRequest,
}
_load_decoder = codec.load_decoder


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.workers = Gauge(
            "switchboard_registry_workers", "Workers by status.", ["status"], registry=registry
        )
        self.events = Counter(
            "switchboard_registry_events_total", "Events published.", ["type"], registry=registry
        )
        self.commands = Counter(
            "switchboard_registry_commands_total",
            "Commands handled.",
            ["op", "outcome"],
            registry=registry,
        )
        self.seq = Gauge("switchboard_registry_seq", "Last published event seq.", registry=registry)
        self.bus = BusMetrics(registry, "registry")


def new_worker_id() -> str:
    return "w-" + uuid.uuid4().hex[:12]


class Registry:
    """The registry process: core state + KV store + event publication."""

    def __init__(
        self,
        bus: Bus,
        store: RegistryStore,
        subjects: Subjects,
        metrics: RegistryMetrics,
        *,
        clock: Callable[[], float] = time.time,
        make_id: Callable[[], str] = new_worker_id,
    ) -> None:
        self.bus = bus
        self.store = store
        self.subjects = subjects
        self.metrics = metrics
        self.clock = clock
        self.make_id = make_id
        self.state = RegistryState()
        self.sequencer = Sequencer("registry", epoch=0)
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        async with self.lock:
            await self._reload()
        log.info(
            "registry loaded",
            extra={
                "epoch": self.sequencer.epoch,
                "seq": self.sequencer.seq,
                "workers": len(self.state.records),
            },
        )

    async def _reload(self) -> None:
        records = await self.store.load()
        self.state.load(records, self.clock())
        self.sequencer = Sequencer("registry", self.store.meta.epoch, self.store.meta.seq)
        self._update_gauges()

    # ---- the one path every change takes ----

    async def execute(self, op: str, run: Callable[[RegistryState], Outcome]) -> CommandReply:
        async with self.lock:
            outcome = await self._commit(run)
        outcome_label = "ok" if not isinstance(outcome.reply, CommandError) else outcome.reply.code
        self.metrics.commands.labels(op, outcome_label).inc()
        return outcome.reply

    async def _commit(self, run: Callable[[RegistryState], Outcome]) -> Outcome:
        for attempt in (1, 2):
            outcome = run(self.state)
            if not outcome.writes and not outcome.events:
                return outcome
            try:
                first = await self.store.reserve(len(outcome.events)) if outcome.events else 0
                await self.store.apply(outcome.writes)
            except StoreConflict as exc:
                log.warning("kv conflict (%s); reloading (attempt %d)", exc, attempt)
                await self._reload()
                if isinstance(exc, UrlTaken) or attempt == 2:
                    return Outcome(
                        reply=CommandError(code="conflict", message=f"concurrent change: {exc}")
                    )
                continue
            await self._publish(outcome, first)
            return outcome
        raise AssertionError("unreachable")

    async def _publish(self, outcome: Outcome, first_seq: int) -> None:
        self.sequencer.seq = first_seq - 1
        now = self.clock()
        for event in outcome.events:
            env = self.sequencer.stamp(event, now)
            await self.bus.publish(self.subjects.registry_events, codec.encode(env))
            self.metrics.events.labels(type(event).__struct_config__.tag).inc()
        self.metrics.seq.set(self.sequencer.seq)
        self._update_gauges()

    def _update_gauges(self) -> None:
        counts = dict.fromkeys(WorkerStatus, 0)
        for record in self.state.records.values():
            counts[record.status] += 1
        for status, n in counts.items():
            self.metrics.workers.labels(status.value).set(n)

    # ---- operations ----

    async def dispatch(self, op: str, request: Any) -> CommandReply:
        now = self.clock()
        match request:
            case RegisterRequest(worker=spec):
                new_id = self.make_id()
                return await self.execute(op, lambda s: s.register(spec, new_id, now))
            case UpsertRequest(worker=spec):
                new_id = self.make_id()
                return await self.execute(op, lambda s: s.upsert(spec, new_id, now))
            case ReplaceRequest(id=worker_id, worker=spec):
                return await self.execute(op, lambda s: s.replace(worker_id, spec, now))
            case SetStatusRequest(id=worker_id, status=status, expected_revision=rev, reason=why):
                return await self.execute(op, lambda s: s.set_status(worker_id, status, rev, why))
            case RemoveRequest(id=worker_id, reason=why):
                return await self.execute(op, lambda s: s.remove(worker_id, why))
            case GetRequest(id=worker_id):
                return await self.execute(op, lambda s: s.get(worker_id))
            case ListRequest(model=model):
                return await self.execute(op, lambda s: s.list_workers(model))
        raise TypeError(f"unhandled request {request!r}")

    async def snapshot(self) -> RegistrySnapshot:
        async with self.lock:
            return RegistrySnapshot(
                epoch=self.sequencer.epoch, seq=self.sequencer.seq, workers=self.state.workers()
            )

    async def heartbeat(self, load: WorkerLoad) -> None:
        now = self.clock()
        async with self.lock:
            await self._commit(lambda s: s.heartbeat(load.worker_id, load.status, now))

    async def expire(self, ttl_s: float) -> None:
        now = self.clock()
        async with self.lock:
            # One commit per worker, so a lost CAS race affects only that worker.
            for worker_id in self.state.expired(now, ttl_s):
                await self._commit(partial(RegistryState.expire_one, worker_id=worker_id))

    async def beacon(self) -> None:
        async with self.lock:
            env = self.sequencer.beacon(
                RegistryBeacon(last_seq=self.sequencer.seq, workers=len(self.state.records)),
                self.clock(),
            )
        await self.bus.publish(self.subjects.registry_events, codec.encode(env))

    # ---- NATS handlers ----

    async def on_command(self, msg: Message) -> None:
        op = msg.subject.rsplit(".", 1)[-1]
        request_type = REQUEST_TYPES.get(op)
        if request_type is None:
            result: CommandReply = CommandError(code="invalid", message=f"unknown op {op!r}")
            self.metrics.commands.labels("unknown", "invalid").inc()
        else:
            try:
                request = codec.decode(msg.data, request_type)
            except codec.DecodeError as exc:
                self.metrics.commands.labels(op, "invalid").inc()
                self.metrics.bus.rejected.labels(f"registry.cmd.{op}").inc()
                result = CommandError(code="invalid", message=f"bad {op} request: {exc}")
            else:
                result = await self.dispatch(op, request)
        await reply(msg, codec.encode(result))

    async def on_snapshot(self, msg: Message) -> None:
        await reply(msg, codec.encode(await self.snapshot()))

    async def on_load(self, msg: Message) -> None:
        try:
            env = _load_decoder.decode(msg.data)
        except codec.DecodeError as exc:
            self.metrics.bus.rejected.labels("load").inc()
            log.warning("bad heartbeat on %s: %s", msg.subject, exc)
            return
        await self.heartbeat(env.body)
