"""The router's gateway admission: one gate per model; a request waits here only while no replica
can take it in time (the fleet view decides) or an operator's capacity override is reached."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from schemas import codec
from schemas.capacity import MAX_CAPACITY, CapacityView
from schemas.dashboard import GatewayLoad
from schemas.subjects import Subjects
from services.admission.core import AdmissionLimits
from services.admission.gate import Gate
from services.common.backoff import Backoff
from services.common.bus import Bus, Message, NoRespondersError, RequestTimeout, decode_or_reject
from services.common.seq import is_newer
from services.router.deadline import capacity_cap, capacity_share
from services.router.metrics import RouterMetrics

log = logging.getLogger(__name__)


class Gateway:
    """Per-model gates whose caps follow the capacity service's views (deadline.capacity_cap);
    each request brings its own patience and `fits` (forward.py), and fleet_moved() lets queued
    ones go when the fleet view changes.

    on_change runs after every change a viewer of the fleet page would see (a gate moved, a new
    capacity view, draining)."""

    def __init__(
        self,
        bus: Bus,
        subjects: Subjects,
        metrics: RouterMetrics,
        on_change: Callable[[], None],
        *,
        queue_depth: int,
        max_wait_s: float,
        capacity_share: float = 1.0,
    ) -> None:
        self.bus, self.subjects, self.metrics, self.on_change = bus, subjects, metrics, on_change
        self.queue_depth, self.max_wait_s = queue_depth, max_wait_s
        self.capacity_share = capacity_share
        self.capacity: CapacityView | None = None
        self._capacity_pos: tuple[int, int] | None = None
        self.gates: dict[str, Gate] = {}
        self.draining = False

    async def start(self) -> None:
        await self.bus.subscribe(self.subjects.capacity_view, cb=self._on_capacity)

    async def _on_capacity(self, msg: Message) -> None:
        env = decode_or_reject(
            codec.capacity_view_decoder, msg.data, self.metrics.bus, "capacity.view"
        )
        if env is not None and is_newer(self._capacity_pos, env.epoch, env.seq):
            self._capacity_pos = (env.epoch, env.seq)
            self.apply_capacity(env.body)

    async def fetch_capacity(self) -> None:
        """The latest view at start (a late reader must not run on a stale default)."""
        pace = Backoff(first_s=0.1, max_s=5.0)
        while self.capacity is None:
            try:
                data = await self.bus.request(self.subjects.capacity_snapshot, b"", 2.0)
                if self.capacity is None:  # a published view may have arrived meanwhile
                    self.apply_capacity(codec.capacity_decoder.decode(data))
                return
            except (NoRespondersError, RequestTimeout):
                log.info("capacity service not answering yet; gateway admission open until it does")
            await pace.wait()

    def apply_capacity(self, view: CapacityView) -> None:
        self.capacity = view
        for model, gate in self.gates.items():
            gate.set_limit(self.cap_for(model))
        self.on_change()

    def limit_for(self, model: str) -> int:
        """This router's share of the model's capacity (the fleet page's `limit`)."""
        if self.capacity is None:
            return MAX_CAPACITY  # unknown: the gateway is open until the first view
        return capacity_share(self.capacity, model, self.capacity_share)

    def cap_for(self, model: str) -> int:
        """What the model's gate holds at most: the share of an operator's override, else no cap."""
        return capacity_cap(self.capacity, model, self.capacity_share)

    def fleet_moved(self, models: Iterable[str] | None = None) -> None:
        """What the fleet view knows moved: queued requests a replica can now take go. `models`:
        a heartbeat's worker's (what it reports is about their replicas only, and 1000 workers
        beat 1000 times a second); None: every model's (a registry event or snapshot)."""
        if models is None:
            for gate in self.gates.values():
                gate.recheck()
            return
        for model in models:
            waiting = self.gates.get(model)
            if waiting is not None:
                waiting.recheck()

    def gate(self, model: str) -> Gate:
        """The model's gate, made on first use (only for models some worker serves)."""
        gate = self.gates.get(model)
        if gate is None:
            limits = AdmissionLimits(
                max_in_flight=self.cap_for(model),
                max_queue_depth=self.queue_depth,
                max_wait_s=self.max_wait_s,
            )
            gate = self.gates[model] = Gate(limits, on_change=self.on_change)
            # Read when scraped, never set per request (a gate moves twice per request).
            core = gate.core
            self.metrics.queue_depth_of(model).set_function(lambda: len(core.queue))
            self.metrics.in_flight_of(model).set_function(lambda: len(core.running))
            if self.draining:
                gate.drain()
        return gate

    def drain(self) -> None:
        """Refuse newcomers from now on; running and queued requests still complete."""
        self.draining = True
        for gate in self.gates.values():
            gate.drain()
        self.on_change()  # live feeds end so the HTTP server can shut down

    def loads(self) -> dict[str, GatewayLoad]:
        return {
            model: GatewayLoad(
                in_flight=gate.core.in_flight,
                queue_depth=gate.core.queue_depth,
                limit=self.limit_for(model),
            )
            for model, gate in self.gates.items()
        }
