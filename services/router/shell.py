"""Router shell state: follows registry events, heartbeats and capacity; owns the gateway gates."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas import codec
from schemas.capacity import MAX_CAPACITY, CapacityView
from schemas.dashboard import FleetSnapshot, GatewayLoad
from schemas.subjects import Subjects
from services.admission.core import AdmissionLimits
from services.admission.gate import Gate
from services.common.bus import Bus, Message, NoRespondersError, RequestTimeout
from services.common.metrics import BusMetrics
from services.common.seq import is_newer
from services.registry.follower import RegistryFollower
from services.router.core import FleetView, RetryBudget

log = logging.getLogger(__name__)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    """`model` labels are models the fleet serves (or "unknown"): clients cannot mint them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "switchboard_router_requests_total",
            "Requests by outcome.",
            ["model", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "switchboard_router_request_duration_seconds",
            "Whole request.",
            ["model"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.ttfb = Histogram(
            "switchboard_router_time_to_first_byte_seconds",
            "Until the first body byte.",
            ["model"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "switchboard_router_upstream_retries_total",
            "Retries on another replica.",
            ["reason"],
            registry=registry,
        )
        self.backpressure = Counter(
            "switchboard_router_backpressure_total",
            "503/429 sent to clients.",
            ["origin"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "switchboard_router_queue_depth", "Gateway queue.", ["model"], registry=registry
        )
        self.in_flight = Gauge(
            "switchboard_router_in_flight", "Requests in flight.", ["model"], registry=registry
        )
        self.stale = Gauge(
            "switchboard_router_stale_heartbeats",
            "Ready workers with stale heartbeats.",
            registry=registry,
        )
        self.dashboard_viewers = Gauge(
            "switchboard_router_dashboard_viewers", "Open /dashboard live feeds.", registry=registry
        )
        self.bus = BusMetrics(registry, "router")


class Changes:
    """Wakes every waiter when what the router knows changes (the dashboard's live feed)."""

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()  # later waiters wait for the next change

    async def wait(self, timeout_s: float, since: int) -> None:
        """Until a change after version `since` (at once if one happened already) or timeout_s."""
        if self.version != since:
            return
        event = self._event
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await event.wait()


class RouterState:
    def __init__(
        self,
        bus: Bus,
        subjects: Subjects,
        metrics: RouterMetrics,
        *,
        queue_depth: int,
        max_wait_s: float,
        capacity_share: float = 1.0,
        retry_budget_ratio: float = 0.2,
        checkpoint_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus, self.subjects, self.metrics, self.clock = bus, subjects, metrics, clock
        self.view = FleetView()
        self.budget = RetryBudget(ratio=retry_budget_ratio)
        self.capacity: CapacityView | None = None
        self._capacity_pos: tuple[int, int] | None = None
        self.capacity_share = capacity_share
        self.queue_depth, self.max_wait_s = queue_depth, max_wait_s
        self.gates: dict[str, Gate] = {}
        self.draining = False
        self.changes = Changes()
        self.follower = RegistryFollower(
            bus,
            subjects,
            self._records_changed,
            on_bad_message=lambda: metrics.bus.rejected.labels("registry.events").inc(),
            checkpoint_interval_s=checkpoint_interval_s,
        )

    async def start(self) -> None:
        await self.follower.start()
        await self.bus.subscribe(self.subjects.load_all, cb=self._on_load)
        await self.bus.subscribe(self.subjects.capacity_view, cb=self._on_capacity)
        await self.bus.flush()

    async def _records_changed(self) -> None:
        self.view.set_records(dict(self.follower.mirror.records))
        self.metrics.stale.set(self.view.stale_count(self.clock()))
        self.changes.notify()

    async def _on_load(self, msg: Message) -> None:
        try:
            env = codec.load_decoder.decode(msg.data)
        except codec.DecodeError:
            self.metrics.bus.rejected.labels("load").inc()
            return
        # Only the record's owner speaks for it: nats-server lets only that NATS user publish
        # on <p>.load.<principal>.*, and a record names its owner.
        parsed = self.subjects.parse_load(msg.subject)
        record = self.view.records.get(env.body.worker_id)
        if parsed is None or parsed[1] != env.body.worker_id:
            self.metrics.bus.rejected.labels("load").inc()
            return
        if record is None:  # not ours to judge yet: the next heartbeat comes within an interval
            return
        if record.owner != parsed[0]:
            self.metrics.bus.rejected.labels("load.not_owner").inc()
            return
        if self.view.heartbeat(env.body.worker_id, env.epoch, env.seq, env.body, self.clock()):
            self.changes.notify()

    async def _on_capacity(self, msg: Message) -> None:
        try:
            env = codec.capacity_view_decoder.decode(msg.data)
        except codec.DecodeError:
            self.metrics.bus.rejected.labels("capacity.view").inc()
            return
        if is_newer(self._capacity_pos, env.epoch, env.seq):
            self._capacity_pos = (env.epoch, env.seq)
            self.apply_capacity(env.body)

    async def fetch_capacity(self) -> None:
        """The latest view at start (a late reader must not run on a stale default)."""
        delay = 0.1
        while self.capacity is None:
            try:
                data = await self.bus.request(self.subjects.capacity_snapshot, b"", 2.0)
                if self.capacity is None:  # a published view may have arrived meanwhile
                    self.apply_capacity(codec.capacity_decoder.decode(data))
                return
            except (NoRespondersError, RequestTimeout):
                log.info("capacity service not answering yet; gateway admission open until it does")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def apply_capacity(self, view: CapacityView) -> None:
        self.capacity = view
        for model, gate in self.gates.items():
            gate.set_limit(self.limit_for(model))
        self.changes.notify()

    def limit_for(self, model: str) -> int:
        if self.capacity is None:
            return MAX_CAPACITY  # unknown: workers' own admission still protects them
        entry = self.capacity.models.get(model, self.capacity.fleet)
        return max(int(entry.capacity * self.capacity_share), 1)

    def gate(self, model: str) -> Gate:
        gate = self.gates.get(model)
        if gate is None:
            limits = AdmissionLimits(
                max_in_flight=self.limit_for(model),
                max_queue_depth=self.queue_depth,
                max_wait_s=self.max_wait_s,
            )

            def changed() -> None:
                core = self.gates[model].core
                self.metrics.queue_depth.labels(model).set(core.queue_depth)
                self.metrics.in_flight.labels(model).set(core.in_flight)
                self.changes.notify()

            gate = self.gates[model] = Gate(limits, on_change=changed)
            if self.draining:
                gate.drain()
        return gate

    def drain(self) -> None:
        self.draining = True
        for gate in self.gates.values():
            gate.drain()
        self.changes.notify()  # live feeds end so the HTTP server can shut down

    def snapshot(self) -> FleetSnapshot:
        gateway = {
            model: GatewayLoad(
                in_flight=gate.core.in_flight,
                queue_depth=gate.core.queue_depth,
                limit=gate.core.limits.max_in_flight,
            )
            for model, gate in self.gates.items()
        }
        return self.view.snapshot(
            self.clock(), self.capacity, gateway, self.follower.mirror.position, time.time()
        )
