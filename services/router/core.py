"""Router fleet view and replica choice. Pure, no I/O.

Choice (documented in docs/router.md; the policies themselves in policy.py):
- Eligible: Ready workers serving the model, not in a Retry-After cooldown, not suspect (a
  connection error since their last heartbeat), not already tried for this request; on a retry
  and for the first attempt the gateway places, only those with room (a replica not heard from
  yet counts as having room).
- busy = in_flight + queue_depth from the worker's last heartbeat + requests this router sent
  it since that heartbeat, so a burst between heartbeats spreads instead of herding.
- Pool: workers with a fresh heartbeat and Ready workers not heard from yet (startup: spread
  over by this router's own dispatches, never piled on the one it knows). A heartbeat older than
  its TTL (3 x the worker's interval) means load unknown, never idle: such workers (and those an
  operator runs without heartbeats) are used only when the pool is empty, with their last known
  load (plus dispatches), never as 0.
- Policy (ROUTER_POLICY): cost (least estimated time to first token, ties at random) or
  least_busy (ties to the smallest id).
- Deadline (the gateway's, services/router/deadline.py): best_estimate is the least estimated
  TTFT a first attempt could get; choose(budget_s=...) keeps only replicas whose estimate is
  within it (a replica whose load is unknown: always), so with need_room it answers "which
  replica can take this request now, in time", or that none can.
"""

from __future__ import annotations

import msgspec

from schemas.capacity import CapacityView
from schemas.dashboard import DashboardWorker, FleetSnapshot, GatewayLoad
from schemas.load import ModelLoad, WorkerLoad
from schemas.prefix import shared_blocks
from schemas.registry import WorkerRecord, WorkerStatus
from services.common.seq import is_newer
from services.registry.index import HEARTBEAT_LABEL
from services.router.kv import DEFAULT_CAP, PrefixCaches
from services.router.policy import (
    Candidate,
    Defaults,
    Draw,
    PolicyName,
    Prompt,
    cheapest,
    least_busy,
    least_estimate_s,
    within,
)

TTL_INTERVALS = 3.0
NO_PROMPT = Prompt()


class Choice(msgspec.Struct, frozen=True):
    worker_id: str
    url: str
    score: int  # its busy count when chosen
    fresh: bool
    estimate_s: float | None = None  # the cost policy's estimated time to first token


class UnknownModel(msgspec.Struct, frozen=True):
    model: str


class NoReplica(msgspec.Struct, frozen=True):
    """The model exists but no replica can take the request now."""

    model: str
    pending: bool  # some worker for it is Pending (starting): worth retrying soon
    reason: str


NoChoice = UnknownModel | NoReplica  # why choose() found no replica: a refusal for the client


class Beat(msgspec.Struct):
    epoch: int
    seq: int
    received_at: float
    load: WorkerLoad


def _middle() -> float:
    return 0.5


class FleetView:
    """What the router knows: registry records (from the mirror), heartbeats, its own
    dispatches, workers' prefix caches; and how it chooses (policy, defaults, a random draw)."""

    def __init__(
        self,
        policy: PolicyName = "cost",
        *,
        draw: Draw = _middle,
        defaults: Defaults | None = None,
        kv_cap: int = DEFAULT_CAP,
    ) -> None:
        self.policy, self.draw = policy, draw
        self.defaults = defaults or Defaults()
        self.records: dict[str, WorkerRecord] = {}
        self.beats: dict[str, Beat] = {}
        self.dispatched: dict[str, int] = {}  # worker -> requests sent since its last heartbeat
        self.cooldown_until: dict[str, float] = {}
        self.suspect_since: dict[str, float] = {}
        self.caches = PrefixCaches(kv_cap)

    # ---- inputs ----

    def set_records(self, records: dict[str, WorkerRecord]) -> None:
        self.records = records
        for table in (self.beats, self.dispatched, self.cooldown_until, self.suspect_since):
            for gone in [w for w in table if w not in records]:
                del table[gone]
        for gone in [w for w in self.caches.workers() if w not in records]:
            self.caches.forget(gone)

    def heartbeat(self, worker_id: str, epoch: int, seq: int, load: WorkerLoad, now: float) -> bool:
        """Latest wins; a fresh heartbeat resets our dispatch count and clears suspicion."""
        beat = self.beats.get(worker_id)
        if not is_newer(None if beat is None else (beat.epoch, beat.seq), epoch, seq):
            return False
        self.beats[worker_id] = Beat(epoch=epoch, seq=seq, received_at=now, load=load)
        self.dispatched[worker_id] = 0
        self.suspect_since.pop(worker_id, None)
        return True

    def dispatched_to(self, worker_id: str, slots: int = 1) -> None:
        """It was sent a request that takes `slots` (n > 1 choices run at once)."""
        self.dispatched[worker_id] = self.dispatched.get(worker_id, 0) + slots

    def busy(self, worker_id: str, retry_after_s: float, now: float) -> None:
        """The worker refused with Retry-After: skip it until then."""
        self.cooldown_until[worker_id] = now + max(retry_after_s, 0.0)

    def connection_failed(self, worker_id: str, now: float) -> None:
        self.suspect_since[worker_id] = now

    # ---- reads ----

    def is_fresh(self, worker_id: str, now: float) -> bool:
        beat = self.beats.get(worker_id)
        if beat is None:
            return False
        return now - beat.received_at <= TTL_INTERVALS * beat.load.heartbeat_interval_s

    def unheard(self, record: WorkerRecord) -> bool:
        """Ready, meant to send heartbeats, and none arrived yet (its load is unknown)."""
        return record.id not in self.beats and record.labels.get(HEARTBEAT_LABEL) != "off"

    def stale_count(self, now: float) -> int:
        """Ready workers without a fresh heartbeat (never heard from, or too long ago)."""
        return sum(
            1
            for w, r in self.records.items()
            if r.status == WorkerStatus.READY and not self.is_fresh(w, now)
        )

    def ready_count(self) -> int:
        return sum(1 for r in self.records.values() if r.status == WorkerStatus.READY)

    def waiting_for(self, now: float) -> int:
        """Ready workers meant to send heartbeats with no fresh one here (what `up` waits on)."""
        return sum(
            1
            for w, r in self.records.items()
            if r.status == WorkerStatus.READY
            and r.labels.get(HEARTBEAT_LABEL) != "off"
            and not self.is_fresh(w, now)
        )

    def model_load(self, worker_id: str, model: str) -> ModelLoad | None:
        beat = self.beats.get(worker_id)
        if beat is None:
            return None
        return next((m for m in beat.load.models if m.id == model), None)

    def score(self, worker_id: str, model: str) -> int:
        load = self.model_load(worker_id, model)
        known = 0 if load is None else load.in_flight + load.queue_depth
        return known + self.dispatched.get(worker_id, 0)

    def has_room(self, worker_id: str, model: str, slots: int = 1) -> bool:
        """Would it take a request of `slots` more without refusing (free slots or queue space)?
        A worker not heard from yet may: a retry is worth a try there (a refusal cools it down)."""
        if worker_id not in self.beats:
            return True
        load = self.model_load(worker_id, model)
        if load is None:
            return False
        # More choices than it has slots: it refuses them at once with its 400 naming `n`, so
        # waiting for that much room would only delay the answer.
        need = slots if slots <= load.max_in_flight else 1
        return self.score(worker_id, model) + need <= load.max_in_flight + load.max_queue_depth

    def serves(self, model: str) -> bool:
        """Some registered worker, in any status, lists the model (else it is unknown: 404)."""
        return any(model in r.models for r in self.records.values())

    def models(self) -> list[str]:
        """Models served by at least one Ready worker."""
        return sorted(
            {m for r in self.records.values() if r.status == WorkerStatus.READY for m in r.models}
        )

    def candidate(self, worker_id: str, model: str, prompt: Prompt) -> Candidate:
        load = self.model_load(worker_id, model)
        held = self.caches.held(worker_id, model)
        cached = shared_blocks(prompt.blocks, held) if prompt.blocks and held else 0
        return Candidate(
            worker_id=worker_id,
            busy=self.score(worker_id, model),
            max_in_flight=1 if load is None else load.max_in_flight,
            service_s=None if load is None else load.service_s,
            prefill_tokens_per_s=None if load is None else load.prefill_tokens_per_s,
            cached_blocks=cached,
            known=load is not None,
        )

    def pool(self, usable: list[WorkerRecord], now: float) -> tuple[list[WorkerRecord], bool]:
        """Whom to choose among, and whether some of them were never heard from (startup)."""
        fresh = [r for r in usable if self.is_fresh(r.id, now)]
        unheard = [r for r in usable if self.unheard(r)]
        # stale load is used only when nothing else is known
        return (fresh + unheard or usable), bool(unheard)

    def best_estimate(self, model: str, now: float, prompt: Prompt = NO_PROMPT) -> float | None:
        """The least estimated TTFT among the replicas a first attempt may go to, room or not
        (unknown load: 0); None when none is eligible (the attempt then says why)."""
        usable = self.eligible(model, now, frozenset(), need_room=False)
        if not isinstance(usable, list):
            return None
        candidates = [self.candidate(r.id, model, prompt) for r in self.pool(usable, now)[0]]
        return least_estimate_s(candidates, prompt, self.defaults)

    def choose(
        self,
        model: str,
        now: float,
        exclude: frozenset[str] = frozenset(),
        need_room: bool = False,
        prompt: Prompt = NO_PROMPT,
        budget_s: float | None = None,
        slots: int = 1,
    ) -> Choice | NoChoice:
        """budget_s: only replicas whose estimated TTFT is within it (see the docstring);
        slots: what the request takes on a worker (its n choices), for need_room."""
        usable = self.eligible(model, now, exclude, need_room, slots)
        if not isinstance(usable, list):
            return usable
        pool, unheard = self.pool(usable, now)
        candidates = [self.candidate(r.id, model, prompt) for r in pool]
        if budget_s is not None:
            candidates = within(candidates, prompt, self.defaults, budget_s)
            if not candidates:
                return NoReplica(model, False, "no replica can start it within its deadline")
        estimate: float | None = None
        if self.policy == "least_busy":
            best = least_busy(candidates, None)
        elif unheard:  # startup: an unknown replica has no cost to compare; spread instead
            best = least_busy(candidates, self.draw)
        else:
            best, estimate = cheapest(candidates, prompt, self.defaults, self.draw)
        url = next(r.url for r in pool if r.id == best.worker_id)
        return Choice(best.worker_id, url, best.busy, self.is_fresh(best.worker_id, now), estimate)

    def eligible(
        self, model: str, now: float, exclude: frozenset[str], need_room: bool, slots: int = 1
    ) -> list[WorkerRecord] | NoChoice:
        """Ready replicas of the model that may take this attempt, or why there are none."""
        serving = [r for r in self.records.values() if model in r.models]
        if not serving:
            return UnknownModel(model)
        pending = any(r.status == WorkerStatus.PENDING for r in serving)
        ready = [r for r in serving if r.status == WorkerStatus.READY and r.id not in exclude]
        usable = [
            r
            for r in ready
            if self.cooldown_until.get(r.id, 0.0) <= now and r.id not in self.suspect_since
        ]
        if need_room:
            usable = [r for r in usable if self.has_room(r.id, model, slots)]
        if usable:
            return usable
        if not ready:
            return NoReplica(model, pending, "no ready replica")
        return NoReplica(model, pending, "every replica is busy or unreachable")

    def snapshot(
        self,
        now: float,
        capacity: CapacityView | None,
        gateway: dict[str, GatewayLoad],
        position: tuple[int, int],
        wall: float,
    ) -> FleetSnapshot:
        """What /dashboard shows: every record with its heartbeat's load, age and freshness."""
        workers = []
        for worker_id in sorted(self.records):
            record = self.records[worker_id]
            beat = self.beats.get(worker_id)
            workers.append(
                DashboardWorker(
                    id=worker_id,
                    url=record.url,
                    status=record.status,
                    models=record.models,
                    load=() if beat is None else beat.load.models,
                    heartbeat_age_s=None if beat is None else round(now - beat.received_at, 1),
                    fresh=self.is_fresh(worker_id, now),
                    cooling_down=self.cooldown_until.get(worker_id, 0.0) > now
                    or worker_id in self.suspect_since,
                )
            )
        return FleetSnapshot(
            workers=tuple(workers),
            capacity=capacity,
            gateway=dict(sorted(gateway.items())),
            registry_epoch=position[0],
            registry_seq=position[1],
            generated_at=wall,
        )
