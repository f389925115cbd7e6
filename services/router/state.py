"""What the router knows of its fleet, and its per-model index kept in step with it. Pure, no I/O.

core.FleetView's inputs change these tables and call `_reindex` for the worker they touched;
what lapses with time is applied by `_advance` when a read next looks at the clock (see
index.Timeline and core.py's docstring).
"""

from __future__ import annotations

import msgspec

from schemas.load import ModelLoad, WorkerLoad
from schemas.prefix import shared_blocks
from schemas.registry import WorkerRecord, WorkerStatus
from services.registry.index import HEARTBEAT_LABEL
from services.router import indexed
from services.router.index import ModelIndex, Profile, Slot, Timeline
from services.router.kv import DEFAULT_CAP, PrefixCaches
from services.router.policy import Candidate, Defaults, Draw, PolicyName, Prompt
from services.router.roster import Roster

TTL_INTERVALS = 3.0


class Beat(msgspec.Struct):
    epoch: int
    seq: int
    received_at: float
    load: WorkerLoad

    def fresh_until(self) -> float:
        return self.received_at + TTL_INTERVALS * self.load.heartbeat_interval_s


class Records(dict[str, WorkerRecord]):
    """The registry's records; a record written in place (tests do) is indexed like any change
    (set_records is the input: the shell hands over the mirror's records)."""

    def __init__(self, view: FleetState, records: dict[str, WorkerRecord]) -> None:
        super().__init__(records)
        self.view = view

    def __setitem__(self, worker_id: str, record: WorkerRecord) -> None:
        self.view.roster.replace(self.get(worker_id), record)
        super().__setitem__(worker_id, record)
        self.view._reindex(worker_id)

    def __delitem__(self, worker_id: str) -> None:
        self.view.roster.replace(self[worker_id], None)
        super().__delitem__(worker_id)
        self.view._reindex(worker_id)


def _middle() -> float:
    return 0.5


class FleetState:
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
        self.roster = Roster()
        self.index: dict[str, ModelIndex] = {}
        self.placed: dict[str, dict[str, Slot]] = {}  # worker -> model -> where it is indexed
        self.timeline = Timeline()
        self.vectored = 0  # choices the groups left to the columns (indexed.py, vector.py)
        self.max_profiles = indexed.MAX_PROFILES  # per tier, beyond which the columns choose

    @property
    def serving(self) -> dict[str, dict[str, WorkerRecord]]:
        return self.roster.serving

    # ---- the index ----

    def _slots(self, worker_id: str) -> dict[str, Slot]:
        """Where the worker belongs in each of its models' indexes at the timeline's time."""
        record, at = self.records.get(worker_id), self.timeline.at
        if record is None or record.status != WorkerStatus.READY:
            return {}
        if self.cooldown_until.get(worker_id, at) > at or worker_id in self.suspect_since:
            return {}
        beat = self.beats.get(worker_id)
        if beat is None:
            tier = int(record.labels.get(HEARTBEAT_LABEL) == "off")
        else:
            tier = int(at > beat.fresh_until())
        slots = {}
        for model in dict.fromkeys(record.models):
            load = self.model_load(worker_id, model)
            profile = (
                Profile(False, beat is not None)
                if load is None
                else Profile(
                    True,
                    True,
                    load.max_in_flight,
                    load.max_queue_depth,
                    load.service_s,
                    load.prefill_tokens_per_s,
                )
            )
            slots[model] = Slot(tier, profile, self.score(worker_id, model))
        return slots

    def _reindex(self, worker_id: str) -> None:
        old, new = self.placed.pop(worker_id, {}), self._slots(worker_id)
        for model, slot in old.items():
            if new.get(model) != slot:
                self.index[model].remove(worker_id)
        for model, slot in new.items():
            if old.get(model) != slot:
                self.index.setdefault(model, ModelIndex()).add(worker_id, slot)
        if new:
            self.placed[worker_id] = new

    def _advance(self, now: float) -> None:
        """Bring the index to `now`: apply what lapsed, or rebuild when time went back."""
        if now < self.timeline.at:
            stale = [(b.fresh_until(), w) for w, b in self.beats.items()]
            self.timeline.restart(now, stale, [(t, w) for w, t in self.cooldown_until.items()])
            for worker_id in list(self.placed.keys() | self.records.keys()):
                self._reindex(worker_id)
            return
        stale, cool = self.timeline.advance(now)
        for until, worker_id in stale:
            beat = self.beats.get(worker_id)
            if beat is not None and beat.fresh_until() == until:
                self._reindex(worker_id)
        for until, worker_id in cool:
            if self.cooldown_until.get(worker_id) == until:
                self._reindex(worker_id)

    def _ask(
        self,
        model: str,
        exclude: frozenset[str],
        need_room: bool,
        slots: int,
        prompt: Prompt,
        budget_s: float | None,
    ) -> indexed.Ask:
        """The question for the index, with the indexed replicas holding the prompt's start."""
        hits: dict[str, int] = {}
        ix = self.index.get(model)
        if prompt.blocks and ix is not None:
            for worker_id in self.caches.holding(model, prompt.blocks[0]):
                if worker_id in ix.slots:
                    held = self.caches.held(worker_id, model)
                    hits[worker_id] = shared_blocks(prompt.blocks, held)
        return indexed.Ask(exclude, need_room, slots, prompt, budget_s, hits)

    # ---- reads of one worker ----

    def is_fresh(self, worker_id: str, now: float) -> bool:
        beat = self.beats.get(worker_id)
        return beat is not None and now <= beat.fresh_until()

    def unheard(self, record: WorkerRecord) -> bool:
        """Ready, meant to send heartbeats, and none arrived yet (its load is unknown)."""
        return record.id not in self.beats and record.labels.get(HEARTBEAT_LABEL) != "off"

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
