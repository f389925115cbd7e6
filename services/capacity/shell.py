"""Capacity shell: follow the registry, recompute on change, publish views, answer late readers.

The latest view is kept three ways so nobody reads a stale default: published on
<p>.capacity.view on every change, stored in JetStream KV (<p>_capacity / "view"), and answered on
<p>.capacity.snapshot. The store is a protocol so shell tests can hand it an in-memory one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas import codec
from schemas.capacity import CapacitySource, CapacityView, ModelCapacity
from schemas.subjects import Subjects
from services.capacity.core import CapacitySettings, compute_view, worth_publishing
from services.common.backoff import Backoff
from services.common.bus import Bus, Message, reply
from services.common.metrics import BusMetrics
from services.common.seq import Sequencer
from services.registry.follower import RegistryFollower

log = logging.getLogger(__name__)
FLEET = "*"
VIEW_KEY = "view"


class ViewStore(Protocol):
    """Where late readers find the latest view: the JetStream KV bucket (main.py) in production."""

    async def put(self, key: str, value: bytes) -> int: ...


class CapacityMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.prometheus = registry  # what /metrics serves (tests read samples from it)
        self.current = Gauge(
            "switchboard_capacity_current",
            "Capacity (model=* is the fleet).",
            ["model"],
            registry=registry,
        )
        self.source = Gauge(
            "switchboard_capacity_source",
            "1 for the active tier.",
            ["model", "source"],
            registry=registry,
        )
        self.available = Gauge(
            "switchboard_capacity_workers_available",
            "Healthy workers.",
            ["model"],
            registry=registry,
        )
        self.recomputes = Counter(
            "switchboard_capacity_recompute_total", "Recomputations.", registry=registry
        )
        self.resnapshots = Counter(
            "switchboard_capacity_resnapshots_total",
            "Registry re-snapshots.",
            ["reason"],
            registry=registry,
        )
        self.gaps = Counter(
            "switchboard_capacity_sequence_gaps_total", "Registry seq gaps.", registry=registry
        )
        self.published = Counter(
            "switchboard_capacity_views_published_total", "Views published.", registry=registry
        )
        self.bus = BusMetrics(registry, "capacity")
        self._models: set[str] = set()

    def show(self, view: CapacityView) -> None:
        entries = {FLEET: view.fleet, **view.models}
        for gone in self._models - set(entries):
            self.current.remove(gone)
            self.available.remove(gone)
            for source in CapacitySource:
                self.source.remove(gone, source.value)
        self._models = set(entries)
        for model, entry in entries.items():
            self._show_one(model, entry)

    def _show_one(self, model: str, entry: ModelCapacity) -> None:
        self.current.labels(model).set(entry.capacity)
        self.available.labels(model).set(entry.workers_available)
        for source in CapacitySource:
            self.source.labels(model, source.value).set(1 if source == entry.source else 0)


class CapacityService:
    def __init__(
        self,
        bus: Bus,
        kv: ViewStore,
        subjects: Subjects,
        settings: CapacitySettings,
        metrics: CapacityMetrics,
        *,
        checkpoint_interval_s: float = 5.0,
        snapshot_timeout_s: float = 2.0,
        restart_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.kv = kv
        self.subjects = subjects
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.restart_s = restart_s
        self.sequencer = Sequencer("capacity", epoch=time.time_ns())
        self.view: CapacityView | None = None  # the latest computed: what a snapshot answers
        self.published: CapacityView | None = None  # the latest both published and stored
        self.computed = asyncio.Event()  # set once self.view holds a view
        self.follower = RegistryFollower(
            bus,
            subjects,
            self.recompute,
            on_resync=self._on_resync,
            bus_metrics=metrics.bus,  # counts an undecodable event under "registry.events"
            checkpoint_interval_s=checkpoint_interval_s,
            snapshot_timeout_s=snapshot_timeout_s,
        )

    async def start(self) -> None:
        """Follow the registry and answer snapshot requests; call once, before supervise()."""
        await self.follower.start()
        await self.bus.subscribe(
            self.subjects.capacity_snapshot, queue="capacity", cb=self.on_snapshot_request
        )
        await self.bus.flush()

    def _on_resync(self, reason: str) -> None:
        self.metrics.resnapshots.labels(reason).inc()
        if reason in ("gap", "beacon"):
            self.metrics.gaps.inc()
        if reason != "checkpoint":
            log.info("registry re-snapshot", extra={"reason": reason})

    async def recompute(self) -> None:
        mirror = self.follower.mirror
        epoch, seq = mirror.position
        view = compute_view(self.settings, mirror.records.values(), epoch, seq)
        self.metrics.recomputes.inc()
        # Compared with what readers were last given, not with the last computed view: a view
        # whose publish or store failed is sent again after the follower's restart.
        if not worth_publishing(self.published, view):
            self.view = view  # keep the newest registry position without publishing noise
            self.computed.set()
            return
        self.view = view
        self.computed.set()
        self.metrics.show(view)
        env = self.sequencer.stamp(view, self.clock())
        data = codec.encode(env)
        await self.bus.publish(self.subjects.capacity_view, data)
        await self.kv.put(VIEW_KEY, data)
        self.published = view
        self.metrics.published.inc()
        fleet = view.fleet
        log.info(
            "capacity %d (%s), %d models",
            fleet.capacity,
            fleet.source.value,
            len(view.models),
            extra={"seq": env.seq},
        )

    async def on_snapshot_request(self, msg: Message) -> None:
        # Wait for a computed view, not just for the follower's sync: a reader must never be
        # answered `null` or a made-up default.
        await self.computed.wait()
        await reply(msg, codec.encode(self.view))

    async def supervise(self) -> None:
        """Run the follower forever; an unexpected exception is logged and it restarts after
        restart_s (a steady pace, not a growing one: each restart begins from a fresh snapshot)."""
        pace = Backoff(first_s=self.restart_s, max_s=self.restart_s)
        while True:
            try:
                await self.follower.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("capacity follower crashed; restarting in %gs", pace.delay)
                self.follower.enqueue("restart")  # whatever it was doing, start from a snapshot
                await pace.wait()
