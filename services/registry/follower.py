"""Async registry follower: feeds RegistryMirror from the bus and fetches snapshots when it says so.

Shared by the capacity service and the router. One task consumes a bounded queue of bus events,
so processing order is explicit; the NATS callback only enqueues. A full queue is a loss like any
other (we drop and re-snapshot), never unbounded memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from msgspec import DecodeError, ValidationError

from schemas import codec
from schemas.base import Envelope
from schemas.registry import RegistryEvent, RegistrySnapshot
from schemas.subjects import Subjects
from services.common.backoff import Backoff
from services.common.bus import (
    Bus,
    Message,
    NoRespondersError,
    RequestTimeout,
    SlowConsumerError,
    decode_or_reject,
)
from services.common.metrics import BusMetrics
from services.registry.mirror import Applied, RegistryMirror, Resync, Step

log = logging.getLogger(__name__)

OnChange = Callable[[], Awaitable[None]]
Lost = str  # a queue item that is a reason string means "events may have been lost"


class RegistryFollower:
    """An event that does not decode is dropped and counted in the consumer's `bus_metrics`
    under "registry.events"; the subscription goes on."""

    def __init__(
        self,
        bus: Bus,
        subjects: Subjects,
        on_change: OnChange,
        *,
        on_resync: Callable[[str], None] = lambda reason: None,
        bus_metrics: BusMetrics,
        checkpoint_interval_s: float = 5.0,
        snapshot_timeout_s: float = 2.0,
        max_backoff_s: float = 2.0,
        queue_size: int = 10_000,
    ) -> None:
        self.bus = bus
        self.subjects = subjects
        self.on_change = on_change
        self.on_resync = on_resync
        self.bus_metrics = bus_metrics
        self.checkpoint_interval_s = checkpoint_interval_s
        self.snapshot_timeout_s = snapshot_timeout_s
        self.max_backoff_s = max_backoff_s
        self.mirror = RegistryMirror()
        self.queue: asyncio.Queue[Envelope[RegistryEvent] | Lost] = asyncio.Queue(queue_size)
        self.synced = asyncio.Event()
        self._sid: int | None = None

    async def start(self) -> None:
        """Subscribe and hook connection trouble; call once before run()."""
        sub = await self.bus.subscribe(self.subjects.registry_events, cb=self._on_msg)
        self._sid = sub._id
        self.bus.on_reconnect(self._on_reconnect)
        self.bus.on_error(self._on_error)
        await self.bus.flush()
        self.enqueue("startup")

    def enqueue(self, item: Envelope[RegistryEvent] | Lost) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # Drop everything queued: a snapshot replaces it all anyway.
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait("queue_overflow")

    async def _on_msg(self, msg: Message) -> None:
        env = decode_or_reject(
            codec.registry_event_decoder, msg.data, self.bus_metrics, "registry.events"
        )
        if env is not None:
            self.enqueue(env)

    async def _on_reconnect(self) -> None:
        self.enqueue("reconnect")

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError) and getattr(exc, "sid", None) == self._sid:
            self.enqueue("slow_consumer")

    async def run(self) -> None:
        """Consume until cancelled. Raises only on bugs; callers supervise (restart) it."""
        checkpoint = asyncio.create_task(self._checkpoints())
        try:
            while True:
                applied = await self._step(await self.queue.get())
                # Coalesce: apply whatever is already queued, then react once to the result.
                while not self.queue.empty():
                    applied = await self._step(self.queue.get_nowait()) or applied
                if applied:
                    await self.on_change()
        finally:
            checkpoint.cancel()

    async def _step(self, item: Envelope[RegistryEvent] | Lost) -> bool:
        step: Step = self.mirror.lost(item) if isinstance(item, str) else self.mirror.observe(item)
        while isinstance(step, Resync):
            self.on_resync(step.reason)
            self.synced.clear()
            step = self.mirror.apply_snapshot(await self._fetch_snapshot(step.reason))
            self.synced.set()
        return isinstance(step, Applied)

    async def _checkpoints(self) -> None:
        # A periodic re-snapshot bounds how long any undetected loss can keep us wrong.
        while True:
            await asyncio.sleep(self.checkpoint_interval_s)
            self.enqueue("checkpoint")

    async def _fetch_snapshot(self, reason: str) -> RegistrySnapshot:
        pace = Backoff(first_s=min(0.05, self.max_backoff_s), max_s=self.max_backoff_s)
        while True:
            try:
                data = await self.bus.request(
                    self.subjects.registry_snapshot, b"", self.snapshot_timeout_s
                )
                snap: RegistrySnapshot = codec.snapshot_decoder.decode(data)
                if reason not in ("checkpoint", "startup"):
                    log.info("re-snapshotted (%s) at seq %d", reason, snap.seq)
                return snap
            except (NoRespondersError, RequestTimeout, DecodeError, ValidationError) as exc:
                log.warning("registry snapshot failed (%r); retrying in %.2fs", exc, pace.delay)
            await pace.wait()
