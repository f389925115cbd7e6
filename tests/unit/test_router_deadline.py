"""The gateway's deadline decisions (targets, refuse at once / wait at most X / admit), which
replica can take a request now, the capacity cap, and the TTFT target's config."""

from __future__ import annotations

import pytest

from schemas.capacity import MAX_CAPACITY, CapacitySource, CapacityView, ModelCapacity
from schemas.load import ModelLoad, WorkerLoad
from schemas.registry import WorkerStatus
from services.common.errors import ConfigError
from services.registry.index import HEARTBEAT_LABEL
from services.router import config
from services.router.core import Choice, FleetView, NoReplica
from services.router.deadline import (
    Patience,
    Placement,
    Targets,
    TooLate,
    capacity_cap,
    capacity_share,
    patience,
)
from services.router.policy import Prompt
from tests.helpers import ready_record as rec

NOW = 100.0
NO_PROMPT = Prompt()
# 10 s by default, 4 s for "quick", priority 1 and up at least 20 s, 5 and up 40 s; asks <= 60 s
TARGETS = Targets(default_s=10.0, per_model={"quick": 4.0}, per_priority={1: 20.0, 5: 40.0})


@pytest.mark.parametrize(
    ("model", "priority", "asked", "target"),
    [
        ("m", 0, None, 10.0),  # the default
        ("quick", 0, None, 4.0),  # the model's own
        ("m", -3, None, 10.0),  # asking for less priority buys no less patience
        ("m", 1, None, 20.0),  # priority buys patience: the largest entry at or below it
        ("m", 4, None, 20.0),
        ("m", 9, None, 40.0),
        ("quick", 1, None, 20.0),  # never less than the model's own
        ("m", 9, 2.5, 2.5),  # a client's ask replaces it, also downwards
        ("m", 0, 45.0, 45.0),
        ("m", 0, 600.0, 60.0),  # clamped to max_s
    ],
)
def test_target(model: str, priority: int, asked: float | None, target: float) -> None:
    assert TARGETS.target_s(model, priority, asked) == target


def test_a_model_target_above_the_priority_entries_is_kept() -> None:
    assert Targets(per_model={"slow": 90.0}, per_priority={1: 20.0}).target_s("slow", 5) == 90.0


@pytest.mark.parametrize(
    ("target", "best", "max_wait", "verdict"),
    [
        (10.0, 0.0, 10.0, Patience(10.0)),  # a free slot now: the most it could wait
        (10.0, 4.0, 10.0, Patience(6.0)),  # wait at most what is left once the estimate is paid
        (10.0, 4.0, 3.0, Patience(3.0)),  # bounded by the gateway's max wait
        (10.0, 10.0, 10.0, Patience(0.0)),  # just in time: admitted only if a replica fits now
        (10.0, 10.2, 10.0, TooLate(1)),  # refused at once; Retry-After is at least 1 s
        (1.0, 4.5, 10.0, TooLate(4)),  # ... roughly when the excess has drained
        (1.0, 500.0, 10.0, TooLate(60)),  # ... at most 60 s
    ],
)
def test_patience(target: float, best: float, max_wait: float, verdict: object) -> None:
    assert patience(target, best, max_wait) == verdict


def beat(wid: str, running: int, queued: int, mif: int, mq: int, service_s: float) -> WorkerLoad:
    model = ModelLoad(
        id="m",
        in_flight=running,
        queue_depth=queued,
        max_in_flight=mif,
        max_queue_depth=mq,
        service_s=service_s,
        prefill_tokens_per_s=1e9,  # prefill ~0: the queue decides
    )
    return WorkerLoad(
        worker_id=wid, url=f"http://{wid}:1", status=WorkerStatus.READY, models=(model,)
    )


def fleet(
    *beats: WorkerLoad, unheard: tuple[str, ...] = (), off: tuple[str, ...] = ()
) -> FleetView:
    v = FleetView("cost")
    records = [rec(b.worker_id) for b in beats] + [rec(w) for w in unheard]
    records += [rec(w, {HEARTBEAT_LABEL: "off"}) for w in off]
    v.set_records({r.id: r for r in records})
    for b in beats:
        v.heartbeat(b.worker_id, 1, 1, b, NOW)
    return v


# A fast replica (4 slots, 2 s per request: a slot frees every 0.5 s) and a slow one (1 slot,
# 6 s per request), each with queue room 4.
FAST_FREE = beat("fast", 3, 0, 4, 4, 2.0)  # a free slot: 0 s
FAST_QUEUED = beat("fast", 4, 3, 4, 4, 2.0)  # 4th in its queue: 2 s
FAST_FULL = beat("fast", 4, 4, 4, 4, 2.0)  # no queue room (its estimate would be 2.5 s)
SLOW_QUEUED = beat("slow", 1, 1, 1, 4, 6.0)  # 2nd in its queue: 12 s
SLOW_FULL = beat("slow", 1, 4, 1, 4, 6.0)  # no room (30 s)


def taker(v: FleetView, budget_s: float) -> str | None:
    """Who takes the request now (Placement.fits's question), or None: it waits at the gateway."""
    choice = v.choose("m", NOW, need_room=True, prompt=NO_PROMPT, budget_s=budget_s)
    if isinstance(choice, NoReplica):
        return None
    assert isinstance(choice, Choice)
    return choice.worker_id


@pytest.mark.parametrize(
    ("beats", "budget", "best", "takes"),
    [
        ((FAST_FREE, SLOW_QUEUED), 10.0, 0.0, "fast"),  # a free slot: admitted, whatever else
        ((FAST_QUEUED, SLOW_FULL), 10.0, 2.0, "fast"),  # a worker queue that meets the deadline
        ((FAST_QUEUED, SLOW_FULL), 1.5, 2.0, None),  # ... but not this one: it waits here
        ((FAST_FULL, SLOW_QUEUED), 20.0, 2.5, "slow"),  # the room is on the slow one, in time
        ((FAST_FULL, SLOW_QUEUED), 10.0, 2.5, None),  # full fast one, slow queue too late: waits
        ((FAST_FULL, SLOW_FULL), 60.0, 2.5, None),  # nobody has room: it waits here
    ],
)
def test_which_replica_can_take_a_request_now(
    beats: tuple[WorkerLoad, ...], budget: float, best: float, takes: str | None
) -> None:
    v = fleet(*beats)
    assert v.best_estimate("m", NOW, NO_PROMPT) == pytest.approx(best)
    assert taker(v, budget) == takes


def test_taking_a_place_is_seen_by_the_next_request() -> None:
    v = fleet(beat("fast", 3, 0, 4, 0, 2.0))  # one free slot, no queue
    assert taker(v, 10.0) == "fast"
    v.dispatched_to("fast")  # what Placement.fits does as it admits
    assert taker(v, 10.0) is None


def placed(place: Placement) -> str | None:
    return None if place.choice is None else place.choice.worker_id


def test_placement_takes_a_replica_within_what_is_left_of_the_target() -> None:
    v = fleet(FAST_QUEUED, SLOW_FULL)  # fast: 2 s in its queue
    clock = [NOW]
    place = Placement(v, lambda: clock[0], "m", NO_PROMPT, deadline=NOW + 3.0)
    clock[0] = NOW + 1.5  # 1.5 s left: too little for 2 s
    assert not place.fits()
    assert placed(place) is None
    assert v.score("fast", "m") == 7  # nothing counted
    clock[0] = NOW + 0.5  # 2.5 s left (as if it had been asked earlier)
    assert place.fits()
    assert placed(place) == "fast"
    assert v.score("fast", "m") == 8  # counted at once: the next in line sees it


def test_a_replica_whose_load_is_unknown_can_take_it() -> None:
    """Never heard from, or heartbeats off: no estimate to refuse or hold on (its own admission
    protects it), even after many dispatches."""
    v = fleet(SLOW_FULL, unheard=("new",), off=("manual",))
    assert v.best_estimate("m", NOW, NO_PROMPT) == 0.0
    assert taker(v, 0.5) == "new"  # the full one has no room; the unheard one is spread to
    manual = fleet(off=("manual",))
    for _ in range(100):  # its dispatch count never resets: it sends no heartbeats
        manual.dispatched_to("manual")
    assert manual.best_estimate("m", NOW, NO_PROMPT) == 0.0
    assert taker(manual, 0.5) == "manual"


def test_no_eligible_replica_has_no_estimate() -> None:
    v = fleet(FAST_FREE)
    v.busy("fast", 5.0, NOW)  # cooling down after a refusal
    assert v.best_estimate("m", NOW, NO_PROMPT) is None  # the attempt's own refusal says why


def capacity(source: CapacitySource, fleet_cap: int, **models: int) -> CapacityView:
    def entry(n: int) -> ModelCapacity:
        return ModelCapacity(capacity=n, source=source, workers_available=2)

    return CapacityView(fleet=entry(fleet_cap), models={m: entry(n) for m, n in models.items()})


@pytest.mark.parametrize(
    ("view", "share", "cap", "share_shown"),
    [
        (None, 1.0, MAX_CAPACITY, None),  # no view yet: open
        (capacity(CapacitySource.WORKER_REPORTED, 40, m=40), 1.0, MAX_CAPACITY, 40),  # slots
        (capacity(CapacitySource.MIXED, 40, m=40), 1.0, MAX_CAPACITY, 40),
        (capacity(CapacitySource.OVERRIDE, 20, m=20), 1.0, 20, 20),  # an operator's cap holds
        (capacity(CapacitySource.OVERRIDE, 20, m=20), 0.5, 10, 10),  # ... this router's share
        (capacity(CapacitySource.OVERRIDE, 20), 0.25, 5, 5),  # the fleet's when no model entry
        (capacity(CapacitySource.OVERRIDE, 3, m=3), 0.1, 1, 1),  # never 0
    ],
)
def test_capacity_cap(
    view: CapacityView | None, share: float, cap: int, share_shown: int | None
) -> None:
    assert capacity_cap(view, "m", share) == cap
    if view is not None:
        assert capacity_share(view, "m", share) == share_shown


def test_ttft_targets_from_env() -> None:
    cfg = config.load(
        [],
        {
            "ROUTER_TTFT_TARGET_S": "2.5",
            "ROUTER_MODEL_TTFT_TARGET_S": "org/big=30,quick=1",
            "ROUTER_PRIORITY_TTFT_TARGET_S": "1=20,-1=0.5",
            "ROUTER_MAX_TTFT_TARGET_S": "90",
        },
    )
    assert cfg.targets() == Targets(
        default_s=2.5,
        per_model={"org/big": 30.0, "quick": 1.0},
        per_priority={1: 20.0, -1: 0.5},
        max_s=90.0,
    )
    assert config.load([], {}).targets() == Targets()  # 10 s, asks up to 60 s


@pytest.mark.parametrize(
    "env",
    [
        {"ROUTER_TTFT_TARGET_S": "0"},
        {"ROUTER_MODEL_TTFT_TARGET_S": "m=-1"},
        {"ROUTER_PRIORITY_TTFT_TARGET_S": "high=5"},
    ],
)
def test_bad_ttft_targets_are_refused_at_start(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="ttft_target_s"):
        config.load([], env)
