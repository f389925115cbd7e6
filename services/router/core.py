"""Router fleet view, replica choice and the table of its own refusals. Pure, no I/O.

Policy (documented in docs/router.md):
- Eligible: Ready workers serving the model, not in a Retry-After cooldown, not suspect (a
  connection error since their last heartbeat), not already tried for this request.
- Score = in_flight + queue_depth from the worker's last heartbeat + requests this router sent
  it since that heartbeat, so a burst between heartbeats spreads instead of herding.
- A heartbeat older than its TTL (3 x the worker's interval) means load unknown, never idle:
  such workers are used only when no worker with a fresh heartbeat is eligible, and then with
  their last known score (plus dispatches), never as 0.
- Lowest score wins; ties go to the smallest worker id.
"""

from __future__ import annotations

import msgspec

from schemas.capacity import CapacityView
from schemas.dashboard import DashboardWorker, FleetSnapshot, GatewayLoad
from schemas.load import ModelLoad, WorkerLoad
from schemas.registry import WorkerRecord, WorkerStatus
from services.common.errors import ApiError, at_capacity
from services.common.seq import is_newer

TTL_INTERVALS = 3.0


class Choice(msgspec.Struct, frozen=True):
    worker_id: str
    url: str
    score: int
    fresh: bool


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


class FleetView:
    """What the router knows: registry records (from the mirror), heartbeats, its own dispatches."""

    def __init__(self) -> None:
        self.records: dict[str, WorkerRecord] = {}
        self.beats: dict[str, Beat] = {}
        self.dispatched: dict[str, int] = {}  # worker -> requests sent since its last heartbeat
        self.cooldown_until: dict[str, float] = {}
        self.suspect_since: dict[str, float] = {}

    # ---- inputs ----

    def set_records(self, records: dict[str, WorkerRecord]) -> None:
        self.records = records
        for table in (self.beats, self.dispatched, self.cooldown_until, self.suspect_since):
            for gone in [w for w in table if w not in records]:
                del table[gone]

    def heartbeat(self, worker_id: str, epoch: int, seq: int, load: WorkerLoad, now: float) -> bool:
        """Latest wins; a fresh heartbeat resets our dispatch count and clears suspicion."""
        beat = self.beats.get(worker_id)
        if not is_newer(None if beat is None else (beat.epoch, beat.seq), epoch, seq):
            return False
        self.beats[worker_id] = Beat(epoch=epoch, seq=seq, received_at=now, load=load)
        self.dispatched[worker_id] = 0
        self.suspect_since.pop(worker_id, None)
        return True

    def dispatched_to(self, worker_id: str) -> None:
        self.dispatched[worker_id] = self.dispatched.get(worker_id, 0) + 1

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

    def stale_count(self, now: float) -> int:
        return sum(
            1
            for w, r in self.records.items()
            if r.status == WorkerStatus.READY and not self.is_fresh(w, now)
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

    def has_room(self, worker_id: str, model: str) -> bool:
        """Would it take one more without refusing (a free slot or queue space)?"""
        load = self.model_load(worker_id, model)
        if load is None:
            return False
        return self.score(worker_id, model) < load.max_in_flight + load.max_queue_depth

    def serves(self, model: str) -> bool:
        """Some registered worker, in any status, lists the model (else it is unknown: 404)."""
        return any(model in r.models for r in self.records.values())

    def models(self) -> list[str]:
        """Models served by at least one Ready worker."""
        return sorted(
            {m for r in self.records.values() if r.status == WorkerStatus.READY for m in r.models}
        )

    def choose(
        self, model: str, now: float, exclude: frozenset[str] = frozenset(), need_room: bool = False
    ) -> Choice | NoChoice:
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
            usable = [r for r in usable if self.has_room(r.id, model)]
        if not usable:
            if not ready:
                return NoReplica(model, pending, "no ready replica")
            return NoReplica(model, pending, "every replica is busy or unreachable")
        fresh = [r for r in usable if self.is_fresh(r.id, now)]
        pool = fresh or usable  # unknown load is used only when nothing is known to be fine
        best = min(pool, key=lambda r: (self.score(r.id, model), r.id))
        return Choice(best.id, best.url, self.score(best.id, model), bool(fresh))

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


# ---- refusals the router itself makes: the one table from outcome to HTTP ----

PENDING_RETRY_AFTER_S = 2  # a replica is starting (rolling update): soon worth another try
NO_REPLICA_RETRY_AFTER_S = 5


def no_choice_error(why: NoChoice) -> ApiError:
    if isinstance(why, UnknownModel):
        return ApiError(
            status=404,
            message=f"model {why.model!r} is not served by any worker",
            type="invalid_request_error",
            code="model_not_found",
            param="model",
        )
    wait = PENDING_RETRY_AFTER_S if why.pending else NO_REPLICA_RETRY_AFTER_S
    suffix = " (a replica is starting)" if why.pending else ""
    return ApiError(
        status=503,
        message=f"no replica can take model {why.model!r} now: {why.reason}{suffix}",
        type="service_unavailable_error",
        code="no_replica_available",
        retry_after_s=wait,
    )


def gateway_busy(model: str, reason: str, retry_after_s: int) -> ApiError:
    """This router's gateway has no room for the model (its share of the fleet's capacity)."""
    return at_capacity("the fleet", model, reason, retry_after_s)


def upstream_unreachable(detail: str) -> ApiError:
    """The last attempt could not connect to its worker (before any byte of an answer)."""
    return ApiError(
        status=502,
        message=f"upstream worker unreachable: {detail}",
        type="server_error",
        code="upstream_unreachable",
    )


class PriorityCaps(msgspec.Struct, frozen=True, kw_only=True):
    """The highest x-switchboard-priority a request may ask for, per API key.

    A higher ask is clamped, not refused: priority is a scheduling hint, and a client that sends
    one header value under several keys should still be served, just not ahead of its grant."""

    default: int = 0
    per_key: dict[str, int] = msgspec.field(default_factory=dict)

    def allowed(self, asked: int, key: str | None) -> int:
        cap = self.default if key is None else self.per_key.get(key, self.default)
        return min(asked, cap)


class RetryBudget:
    """Retries may add at most `ratio` of the request volume (plus a small floor), so a fleet in
    trouble is not hit by a retry storm. Each request deposits `ratio`; each retry costs 1."""

    def __init__(self, ratio: float = 0.2, floor: float = 10.0, cap: float = 100.0) -> None:
        self.ratio, self.cap = ratio, cap
        self.tokens = floor

    def request(self) -> None:
        self.tokens = min(self.tokens + self.ratio, self.cap)

    def try_retry(self) -> bool:
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def parse_retry_after(value: str | None, default_s: float = 1.0) -> float:
    """Seconds from a Retry-After header (delta-seconds form); default when absent or odd."""
    if value is None:
        return default_s
    try:
        return max(float(value.strip()), 0.0)
    except ValueError:
        return default_s
