"""Registry shell: serializes each change, persists it by CAS, publishes its events in seq order.

One asyncio lock orders all mutations in this process, so the publish order equals the seq order.
Memory changes only after the KV writes succeeded. A CAS conflict (another registry process wrote
first) reloads the book from KV and retries once; any other failure answers `unavailable`, and a
write whose fate is unknown (cut off mid-way) makes the next change reload from KV first.
A heartbeat that changes no record (nearly all of them) only restarts its worker's liveness clock,
without the lock, when memory is known to be what the locked path would plan on (`_settled`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas import codec
from schemas.load import WorkerLoad
from schemas.registry import (
    Command,
    CommandError,
    CommandReply,
    RegisterRequest,
    RegistryBeacon,
    RegistrySnapshot,
    UpsertRequest,
    WorkerStatus,
)
from schemas.subjects import Subjects
from services.common.bus import Bus
from services.common.logging import clip
from services.common.metrics import BusMetrics
from services.common.seq import Sequencer
from services.registry.core import OPERATOR, RegistryBook
from services.registry.effects import DeleteRecord, Effect, PutRecord
from services.registry.store import RegistryStore, StoreConflict, StoreUnavailable, UrlTaken

log = logging.getLogger(__name__)


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.prometheus = registry  # what /metrics serves (tests read samples from it)
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


def _unavailable(message: str) -> Effect:
    return Effect(reply=CommandError(code="unavailable", message=message))


def _records_written(effect: Effect) -> frozenset[str]:
    """The workers whose records the effect's writes put or delete (URL claims change none)."""
    return frozenset(
        w.record.id if isinstance(w, PutRecord) else w.worker_id
        for w in effect.writes
        if isinstance(w, PutRecord | DeleteRecord)
    )


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
        write_timeout_s: float = 2.0,
    ) -> None:
        self.bus = bus
        self.store = store
        self.subjects = subjects
        self.metrics = metrics
        self.clock = clock
        self.make_id = make_id
        self.book = RegistryBook()  # all records; change it only through _commit
        self.sequencer = Sequencer("registry", epoch=0)
        self.lock = asyncio.Lock()
        # Bounds one change's KV writes (each a JetStream request with a 5 s timeout of its own).
        self.write_timeout_s = write_timeout_s
        self.unsure = False  # a write was cut off: KV may hold more than memory does
        self.reloading = False  # memory is being rebuilt from KV
        self.writing: frozenset[str] | None = None  # records the change in flight writes
        self.reconnects_seen = self._reconnects()
        self.refusals_logged_at = float("-inf")
        self.heard_at: dict[str, float] = {}

    async def start(self) -> None:
        async with self.lock:
            await self._reload()
        log.info(
            "registry loaded",
            extra={
                "epoch": self.sequencer.epoch,
                "seq": self.sequencer.seq,
                "workers": len(self.book.records),
            },
        )

    async def _reload(self) -> None:
        self.reloading = True
        try:
            records = await self.store.load()
        finally:
            self.reloading = False
        self.book.load(records, self.clock())
        self.sequencer = Sequencer("registry", self.store.meta.epoch, self.store.meta.seq)
        self.unsure = False
        self.metrics.seq.set(self.sequencer.seq)
        self._update_gauges()

    async def _try_reload(self) -> bool:
        try:
            await self._reload()
        except Exception as exc:
            self.unsure = True
            log.warning("reloading from KV failed: %r", exc)
            return False
        return True

    # ---- NATS outages ----

    def _reconnects(self) -> int:
        # nats-py counts a reconnect before it reports itself connected again, so this moves
        # even when an outage falls between two expiry ticks (the reconnect callback comes later).
        return int(self.bus.nc.stats["reconnects"])

    async def _resync(self) -> None:
        """Before any change: after a reconnect every worker gets a restart's grace; after a
        write cut off mid-way, memory is rebuilt from KV (which may hold more than it does)."""
        reconnects = self._reconnects()
        if reconnects != self.reconnects_seen:
            self.reconnects_seen = reconnects
            self.book.grace(self.clock())
            log.info("nats reconnected: heartbeat expiry restarts from now for every worker")
        if self.unsure and self.bus.connected:
            await self._try_reload()

    # ---- the one path every change takes ----

    async def execute(self, op: str, run: Callable[[RegistryBook], Effect]) -> CommandReply:
        async with self.lock:
            effect = await self._commit(run)
        result = "ok" if not isinstance(effect.reply, CommandError) else effect.reply.code
        self.metrics.commands.labels(op, result).inc()
        return effect.reply

    async def _commit(self, plan: Callable[[RegistryBook], Effect]) -> Effect:
        """Plan on the state, persist the plan, and only then apply it to memory and publish."""
        await self._resync()
        for attempt in (1, 2):
            effect = plan(self.book)
            if not effect.writes and not effect.events:  # a read, a no-op or a refusal
                self.book.commit(effect)
                return effect
            if self.unsure:
                return _unavailable("registry cannot reach its KV store (NATS)")
            self.writing = _records_written(effect)
            try:
                first = await self._persist(effect)
            except StoreConflict as exc:
                log.warning("kv conflict (%s); reloading (attempt %d)", exc, attempt)
                if not await self._try_reload():
                    return _unavailable(f"registry lost its KV store mid-change: {exc}")
                if isinstance(exc, UrlTaken) or attempt == 2:
                    return Effect(
                        reply=CommandError(code="conflict", message=f"concurrent change: {exc}")
                    )
                continue
            except StoreUnavailable as exc:
                log.warning("change refused: %s", exc)
                return _unavailable(f"registry cannot reach its KV store: {exc}")
            except Exception as exc:  # any failure: memory stays as it was, the client is told
                log.warning("kv write failed (%r); memory unchanged, KV will be re-read", exc)
                return _unavailable("registry could not persist the change (NATS trouble)")
            finally:
                self.writing = None
            self.book.commit(effect)
            await self._publish(effect, first)
            return effect
        raise AssertionError("unreachable")

    async def _persist(self, effect: Effect) -> int:
        """Reserve the events' seqs and do the writes; return the first seq reserved."""
        self.unsure = True  # until we know how far the writes got
        async with asyncio.timeout(self.write_timeout_s):
            first = await self.store.reserve(len(effect.events)) if effect.events else 0
            await self.store.apply(effect.writes)
        self.unsure = False
        return first

    async def _publish(self, effect: Effect, first_seq: int) -> None:
        self.sequencer.seq = first_seq - 1
        now = self.clock()
        self._update_gauges()
        for event in effect.events:
            env = self.sequencer.stamp(event, now)
            try:
                await self.bus.publish(self.subjects.registry_events, codec.encode(env))
            except Exception as exc:  # the change is durable; the beacon will reveal the gap
                log.warning("publishing seq %d failed: %r", env.seq, exc)
                break
            self.metrics.events.labels(type(event).__struct_config__.tag).inc()
        self.metrics.seq.set(self.sequencer.seq)

    def _update_gauges(self) -> None:
        counts = dict.fromkeys(WorkerStatus, 0)
        for record in self.book.records.values():
            counts[record.status] += 1
        for status, n in counts.items():
            self.metrics.workers.labels(status.value).set(n)

    # ---- operations ----

    async def dispatch(self, request: Command, principal: str = OPERATOR) -> CommandReply:
        """Run one command; principal is the worker's NATS user, OPERATOR for full rights."""
        now = self.clock()
        new_id = self.make_id() if isinstance(request, RegisterRequest | UpsertRequest) else ""
        return await self.execute(request.op, lambda b: b.run(request, principal, new_id, now))

    async def snapshot(self) -> RegistrySnapshot:
        async with self.lock:
            workers = self.book.workers()
            heard = {w.id: self.heard_at[w.id] for w in workers if w.id in self.heard_at}
            return RegistrySnapshot(
                epoch=self.sequencer.epoch, seq=self.sequencer.seq, workers=workers, heard_at=heard
            )

    async def heartbeat(self, load: WorkerLoad, principal: str = OPERATOR) -> None:
        """One that changes no record restarts the liveness clock at once: 1000 workers beating
        at 1 Hz must not queue commands behind them. One that changes a status (NotReady ->
        Ready), or one heard while memory may not be what the lock would show it, takes the path
        every change takes."""
        now = self.clock()

        def plan(book: RegistryBook) -> Effect:
            return book.heartbeat(load.worker_id, load.status, now, principal)

        effect = plan(self.book) if self._settled(load.worker_id) else None
        if effect is not None and not effect.writes and not effect.events:
            self.book.commit(effect)  # its beat only (or nothing: a refusal)
        else:
            async with self.lock:
                effect = await self._commit(plan)
        if isinstance(effect.reply, CommandError):
            if effect.reply.code == "forbidden":
                self._refused_heartbeat(principal, load.worker_id, now)
        elif load.worker_id in self.book.records:
            self.heard_at[load.worker_id] = now
            # bounded: removed workers' entries are dropped once they outnumber the live ones
            if len(self.heard_at) > 2 * len(self.book.records) + 16:
                self.heard_at = {k: v for k, v in self.heard_at.items() if k in self.book.records}

    def _settled(self, worker_id: str) -> bool:
        """Whether the book, as it is, is what the locked path would plan this worker's heartbeat
        on: no reload under way or owed (a write cut off, a reconnect's grace to give), and no
        change in flight that writes this worker's record (a heartbeat planned on its old record
        could miss the transition the new one calls for)."""
        if self.reloading or self._reconnects() != self.reconnects_seen:
            return False
        if self.writing is None:
            return not self.unsure
        # `unsure` is then the write's own mark: _commit writes nothing while it is set before.
        return worker_id not in self.writing

    def _refused_heartbeat(self, principal: str, worker_id: str, now: float) -> None:
        """Counted every time, logged at most every 10 s: a misbehaving worker floods neither."""
        self.metrics.bus.rejected.labels("load.not_owner").inc()
        if now - self.refusals_logged_at >= 10.0:
            self.refusals_logged_at = now
            log.warning(
                "heartbeat refused: %s does not own worker %s",
                clip(principal, 64),
                clip(worker_id, 64),
            )

    async def expire(self, ttl_s: float) -> None:
        async with self.lock:
            if not self.bus.connected:  # no heartbeat can reach us; the reconnect grants grace
                return
            await self._resync()
            now = self.clock()
            # One commit per worker, so a lost CAS race affects only that worker.
            for worker_id in self.book.expired(now, ttl_s):
                await self._commit(
                    partial(RegistryBook.expire_one, worker_id=worker_id, now=now, ttl_s=ttl_s)
                )

    async def beacon(self) -> None:
        async with self.lock:
            env = self.sequencer.beacon(
                RegistryBeacon(last_seq=self.sequencer.seq, workers=len(self.book.records)),
                self.clock(),
            )
        await self.bus.publish(self.subjects.registry_events, codec.encode(env))
