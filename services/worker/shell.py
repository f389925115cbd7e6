"""Worker lifecycle on the bus: register, heartbeat load, stay registered, drain and deregister;
and its prefix caches' block events.

What to say and what to repair is decided in core.py; this module does the talking. The worker
speaks as its principal (its NATS user): its commands and heartbeats go on subjects that carry
that name, and the registry lets it touch only the records it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence

from schemas import codec
from schemas.load import WorkerLoad
from schemas.registry import (
    CommandError,
    CommandOk,
    GetRequest,
    RemoveRequest,
    ReplaceRequest,
    SetStatusRequest,
    UpsertRequest,
    WorkerSpec,
    WorkerStatus,
)
from schemas.subjects import Subjects
from services.common.backoff import Backoff
from services.common.bus import Bus, NoRespondersError, RequestTimeout
from services.common.seq import Sequencer
from services.registry.client import RegistryClient
from services.worker.core import backlog, repair, slots, worker_load, worker_spec
from services.worker.prefix_cache import Changes, PrefixCache, kv_event
from services.worker.served import ServedModel, admissions, stats

log = logging.getLogger(__name__)
MIN_PUBLISH_GAP_S = 0.05  # debounce: at most ~20 load (and kv) messages a second


class Lifecycle:
    """The worker's life in the fleet: Pending -> Ready (heartbeats) -> Draining -> removed.

    check_interval_s: how often the record is read back (stay_registered); registry_timeout_s:
    how long one registry request waits for its answer."""

    def __init__(
        self,
        bus: Bus,
        subjects: Subjects,
        url: str,
        models: dict[str, ServedModel],
        *,
        labels: dict[str, str],
        heartbeat_interval_s: float,
        principal: str,
        check_interval_s: float = 2.0,
        registry_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.subjects = subjects
        self.principal = principal
        self.url = url
        self.models = models
        self.labels = labels
        self.interval_s = heartbeat_interval_s
        self.check_interval_s = check_interval_s
        self.clock = clock
        self.registry = RegistryClient(bus, subjects, registry_timeout_s, principal=principal)
        self.worker_id: str | None = None
        self.status = WorkerStatus.READY
        self.dirty = asyncio.Event()
        self.sequencer: Sequencer | None = None
        self.published = 0

    def spec(self) -> WorkerSpec:
        return worker_spec(self.url, slots(admissions(self.models)), self.labels)

    async def register(self) -> str:
        """Upsert our record until the registry answers; the id comes back from it."""
        pace = Backoff(first_s=0.1, max_s=5.0)
        while True:
            try:
                reply = await self.registry.call(UpsertRequest(worker=self.spec()))
            except (NoRespondersError, RequestTimeout) as exc:
                log.warning("registry not reachable (%r); retrying in %.1fs", exc, pace.delay)
            else:
                if isinstance(reply, CommandOk) and reply.worker is not None:
                    if reply.worker.id != self.worker_id:
                        self.worker_id = reply.worker.id
                        self.sequencer = Sequencer(self.worker_id, epoch=time.time_ns())
                    log.info("registered", extra={"worker_id": self.worker_id, "url": self.url})
                    return self.worker_id
                log.error("registry refused our registration: %s", reply)
            await pace.wait()

    def in_flight(self) -> int:
        return backlog(admissions(self.models))

    def load(self) -> WorkerLoad:
        assert self.worker_id is not None
        return worker_load(
            self.worker_id,
            self.url,
            self.status,
            self.interval_s,
            admissions(self.models),
            stats(self.models),
        )

    async def publish_load(self) -> None:
        assert self.worker_id is not None
        assert self.sequencer is not None
        env = self.sequencer.stamp(self.load(), self.clock())
        subject = self.subjects.load(self.principal, self.worker_id)
        await self.bus.publish(subject, codec.encode(env))
        self.published += 1

    async def heartbeats(self) -> None:
        """Publish on change (debounced) and at least every interval."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dirty.wait(), self.interval_s)
            self.dirty.clear()
            await self.publish_load()
            await asyncio.sleep(MIN_PUBLISH_GAP_S)

    async def stay_registered(self) -> None:
        """Every check_interval_s: a registry that lost or removed our record gets it back (e.g.
        after losing its KV), and a record someone else changed is put right (see repair())."""
        while True:
            await asyncio.sleep(self.check_interval_s)
            with contextlib.suppress(NoRespondersError, RequestTimeout):
                await self.check()

    async def check(self) -> None:
        """Read our record back and repair it if it is not what we chose."""
        if self.worker_id is None:
            return
        reply = await self.registry.call(GetRequest(id=self.worker_id))
        if isinstance(reply, CommandError) and reply.code != "not_found":
            log.warning("cannot read our registry record: %s", reply.message)
            return
        record = reply.worker if isinstance(reply, CommandOk) else None
        action = repair(record, self.spec(), self.status)
        if action is None or (action == "register" and self.status == WorkerStatus.DRAINING):
            return  # a draining worker is leaving: it does not come back
        log.warning(
            "our registry record was changed by someone else; putting it right",
            extra={"worker_id": self.worker_id, "action": action},
        )
        if action == "register":
            await self.register()
        elif action == "replace":
            answer = await self.registry.call(ReplaceRequest(id=self.worker_id, worker=self.spec()))
            if isinstance(answer, CommandError):
                log.warning("restoring our record failed: %s", answer.message)
        else:
            await self.registry.call(
                SetStatusRequest(id=self.worker_id, status=WorkerStatus.DRAINING, reason="drain")
            )
        self.dirty.set()  # a heartbeat at once: it moves Pending to Ready

    async def drain(self, timeout_s: float) -> None:
        """Draining: refuse newcomers, let running and queued requests finish, then deregister."""
        self.status = WorkerStatus.DRAINING
        for served in self.models.values():
            served.gate.drain()
        if self.worker_id is not None:
            with contextlib.suppress(NoRespondersError, RequestTimeout):
                await self.registry.call(
                    SetStatusRequest(
                        id=self.worker_id, status=WorkerStatus.DRAINING, reason="sigterm"
                    )
                )
        self.dirty.set()
        try:
            async with asyncio.timeout(timeout_s):
                for served in self.models.values():
                    await served.gate.idle.wait()
        except TimeoutError:
            log.warning("drain timeout: %s requests still running", self.in_flight())
        if self.worker_id is not None:
            with contextlib.suppress(NoRespondersError, RequestTimeout):
                await self.registry.call(RemoveRequest(id=self.worker_id, reason="drained"))
        log.info("drained", extra={"worker_id": self.worker_id})


class KvEvents:
    """The prefix caches' block events on <p>.kv.<principal>.<worker_id> (schemas/kv.py).

    One sequenced stream per worker (a new epoch per start, or per new worker id): a full snapshot
    of every cache first and every snapshot_interval_s; in between each model's changes, netted
    and batched, at most one message per model every MIN_PUBLISH_GAP_S (never reordered: one task
    stamps and sends). A router that sees a gap waits for the next snapshot."""

    def __init__(
        self,
        bus: Bus,
        subjects: Subjects,
        principal: str,
        caches: dict[str, PrefixCache],
        *,
        worker_id: Callable[[], str | None],
        snapshot_interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus, self.subjects, self.principal = bus, subjects, principal
        self.caches = caches
        self.worker_id = worker_id
        self.snapshot_interval_s = snapshot_interval_s
        self.clock = clock
        self.changes = {model: Changes() for model in caches}
        for model, cache in caches.items():
            cache.watch(functools.partial(self._changed, model))
        self.dirty = asyncio.Event()
        self.sequencer: Sequencer | None = None
        self.published = 0

    def _changed(self, model: str, stored: Sequence[int], evicted: Sequence[int]) -> None:
        self.changes[model].add(stored, evicted)
        self.dirty.set()

    async def run(self) -> None:
        """Publish until cancelled (started once registered: the subject names the worker id)."""
        next_full = 0.0
        while True:
            worker_id = self.worker_id()
            if worker_id is not None:
                fresh = self.sequencer is None or self.sequencer.source != worker_id
                if fresh:
                    self.sequencer = Sequencer(worker_id, epoch=time.time_ns())
                now = time.monotonic()
                full = fresh or now >= next_full
                if full:
                    next_full = now + self.snapshot_interval_s
                self.dirty.clear()
                await self.publish(worker_id, full)
            await asyncio.sleep(MIN_PUBLISH_GAP_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dirty.wait(), max(next_full - time.monotonic(), 0))

    async def publish(self, worker_id: str, full: bool) -> None:
        """One message per model that has something to say (every model when full)."""
        assert self.sequencer is not None
        subject = self.subjects.kv(self.principal, worker_id)
        for model, cache in self.caches.items():
            event = kv_event(worker_id, model, cache, self.changes[model], full)
            if event is not None:
                env = self.sequencer.stamp(event, self.clock())
                await self.bus.publish(subject, codec.encode(env))
                self.published += 1
