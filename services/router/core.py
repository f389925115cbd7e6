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

How (issue #17): every input updates a per-model index (index.py) of the eligible replicas by
tier, profile and busy count, and what lapses with time (a heartbeat going stale, a cooldown
ending) is applied when a read next looks at the clock (index.Timeline), so a choice costs
O(profiles + prefix holders + tried replicas), not O(workers) (indexed.py). Where replicas
report their own measured rates (many profiles), or measured and unmeasured ones mix, the
choice is vector.py's: the model's replicas as columns (table.py, kept in step by the index),
a few numpy passes, exact like the index. scan.py is the semantics literally (the reference the
tests hold both to). The clock is meant to be monotonic: a read at an earlier time than the
last one rebuilds the index at that time.
"""

from __future__ import annotations

from schemas.capacity import CapacityView
from schemas.dashboard import DashboardWorker, FleetSnapshot, GatewayLoad
from schemas.load import WorkerLoad
from schemas.registry import WorkerRecord, WorkerStatus
from services.common.seq import is_newer
from services.registry.index import HEARTBEAT_LABEL
from services.router import indexed, scan, vector
from services.router.choices import Choice, NoChoice, NoReplica, UnknownModel
from services.router.index import ModelIndex
from services.router.policy import Prompt
from services.router.roster import Roster
from services.router.state import TTL_INTERVALS, Beat, FleetState, Records

__all__ = [
    "TTL_INTERVALS",
    "Beat",
    "Choice",
    "FleetView",
    "NoChoice",
    "NoReplica",
    "UnknownModel",
]

NO_PROMPT = Prompt()
NOWHERE = ModelIndex()  # the index of a model no replica can take now


class FleetView(FleetState):
    """What the router knows (FleetState) and how it chooses: the inputs keep its index in
    step; reads answer from it."""

    # ---- inputs ----

    def set_records(self, records: dict[str, WorkerRecord]) -> None:
        old, self.records = self.records, Records(self, records)
        for table in (self.beats, self.dispatched, self.cooldown_until, self.suspect_since):
            for gone in [w for w in table if w not in records]:
                del table[gone]
        for gone in [w for w in self.caches.workers() if w not in records]:
            self.caches.forget(gone)
        self.roster = Roster(records)
        for worker_id in [w for w in old if w not in records]:
            self._reindex(worker_id)
        for worker_id, record in records.items():
            if old.get(worker_id) != record:
                self._reindex(worker_id)

    def set_record(self, record: WorkerRecord) -> None:
        """One record added or changed (a registry event): O(its models), unlike set_records."""
        if self.records.get(record.id) != record:
            self.records[record.id] = record  # Records keeps the roster and the index in step

    def drop_record(self, worker_id: str) -> None:
        """One record removed (a registry event): what the view knew of the worker goes too."""
        if worker_id in self.records:
            del self.records[worker_id]
        for table in (self.beats, self.dispatched, self.cooldown_until, self.suspect_since):
            table.pop(worker_id, None)
        self.caches.forget(worker_id)
        self._reindex(worker_id)

    def heartbeat(self, worker_id: str, epoch: int, seq: int, load: WorkerLoad, now: float) -> bool:
        """Latest wins; a fresh heartbeat resets our dispatch count and clears suspicion."""
        beat = self.beats.get(worker_id)
        if not is_newer(None if beat is None else (beat.epoch, beat.seq), epoch, seq):
            return False
        if now >= self.timeline.at:
            self._advance(now)  # what lapsed meanwhile leaves the index (it stays small)
        beat = self.beats[worker_id] = Beat(epoch=epoch, seq=seq, received_at=now, load=load)
        self.timeline.lapses(beat.fresh_until(), worker_id, stale=True)
        self.dispatched[worker_id] = 0
        self.suspect_since.pop(worker_id, None)
        self._reindex(worker_id)
        return True

    def dispatched_to(self, worker_id: str, slots: int = 1) -> None:
        """It was sent a request that takes `slots` (n > 1 choices run at once)."""
        self.dispatched[worker_id] = self.dispatched.get(worker_id, 0) + slots
        self._reindex(worker_id)

    def busy(self, worker_id: str, retry_after_s: float, now: float) -> None:
        """The worker refused with Retry-After: skip it until then."""
        until = self.cooldown_until[worker_id] = now + max(retry_after_s, 0.0)
        self.timeline.lapses(until, worker_id, stale=False)
        self._reindex(worker_id)

    def connection_failed(self, worker_id: str, now: float) -> None:
        self.suspect_since[worker_id] = now
        self._reindex(worker_id)

    # ---- reads ----

    def stale_count(self, now: float) -> int:
        """Ready workers without a fresh heartbeat (never heard from, or too long ago)."""
        return sum(
            1
            for w, r in self.records.items()
            if r.status == WorkerStatus.READY and not self.is_fresh(w, now)
        )

    def ready_count(self) -> int:
        return self.roster.ready

    def waiting_for(self, now: float) -> int:
        """Ready workers meant to send heartbeats with no fresh one here (what `up` waits on)."""
        return sum(
            1
            for w, r in self.records.items()
            if r.status == WorkerStatus.READY
            and r.labels.get(HEARTBEAT_LABEL) != "off"
            and not self.is_fresh(w, now)
        )

    def any_first_tier(self, model: str) -> bool:
        """Some eligible replica of the model has a fresh heartbeat or was never heard from (the
        pool choices take first), as of the index's time: the last read's."""
        return bool(self.index.get(model, NOWHERE).tiers[0])

    def serves(self, model: str) -> bool:
        """Some registered worker, in any status, lists the model (else it is unknown: 404)."""
        return model in self.roster.serving

    def models(self) -> list[str]:
        """Models served by at least one Ready worker."""
        return list(self.roster.models)

    def pool(self, usable: list[WorkerRecord], now: float) -> tuple[list[WorkerRecord], bool]:
        """Whom to choose among, and whether some of them were never heard from (startup)."""
        return scan.pool(self, usable, now)

    def eligible(
        self, model: str, now: float, exclude: frozenset[str], need_room: bool, slots: int = 1
    ) -> list[WorkerRecord] | NoChoice:
        """Ready replicas of the model that may take this attempt, or why there are none (a
        scan of its replicas: choices use the index)."""
        return scan.eligible(self, model, now, exclude, need_room, slots)

    def best_estimate(self, model: str, now: float, prompt: Prompt = NO_PROMPT) -> float | None:
        """The least estimated TTFT among the replicas a first attempt may go to, room or not
        (unknown load: 0); None when none is eligible (the attempt then says why)."""
        if model not in self.roster.serving:
            return None
        self._advance(now)
        ask = self._ask(model, frozenset(), False, 1, prompt, None)
        ix = self.index.get(model, NOWHERE)
        found = indexed.pool(ix, ask, self.defaults, self.max_profiles)
        if isinstance(found, str):
            self.vectored += 1
            return vector.best_estimate(ix, self.roster.serving[model], ask, self.defaults)
        return None if found is None else min(o.known_s for o in found.options)

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
        if model not in self.roster.serving:
            return UnknownModel(model)
        self._advance(now)
        ask = self._ask(model, exclude, need_room, slots, prompt, budget_s)
        ix = self.index.get(model, NOWHERE)
        found = indexed.pool(ix, ask, self.defaults, self.max_profiles)
        picked: vector.Picked | vector.Late | None
        if isinstance(found, str):
            self.vectored += 1
            serving = self.roster.serving[model]
            picked = vector.choose(ix, serving, ask, self.policy, self.defaults, self.draw)
        elif found is None or not found.options:
            picked = None if found is None else vector.LATE
        else:
            picked = indexed.chosen(found, self.policy, self.defaults, self.draw)
        if picked is None:
            pending = self.roster.pending_of[model] > 0
            if self.roster.ready_left(model, exclude) == 0:
                return NoReplica(model, pending, "no ready replica")
            return NoReplica(model, pending, "every replica is busy or unreachable")
        if picked == vector.LATE:  # usable replicas, none in time
            return NoReplica(model, False, "no replica can start it within its deadline")
        worker_id, busy, estimate = picked
        fresh = self.is_fresh(worker_id, now)
        return Choice(worker_id, self.records[worker_id].url, busy, fresh, estimate)

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
