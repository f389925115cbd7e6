"""Router choice (eligibility, stale heartbeats, cooldown, suspects; the least_busy policy), which
models it serves, the table of its refusals, priority caps."""

from __future__ import annotations

from collections import Counter

import pytest

from schemas import codec
from schemas.load import ModelLoad, WorkerLoad
from schemas.registry import WorkerRecord, WorkerStatus
from services.common.errors import ConfigError
from services.router import config
from services.router.core import Choice, FleetView, NoChoice, NoReplica, UnknownModel
from services.router.http import RoutingFields
from services.router.policy import PolicyName
from services.router.rules import (
    PriorityCaps,
    gateway_busy,
    no_choice_error,
    upstream_unreachable,
)

S = WorkerStatus


def rec(wid: str, status: WorkerStatus = S.READY, models: tuple[str, ...] = ("m",)) -> WorkerRecord:
    return WorkerRecord(id=wid, url=f"http://{wid}:1", models=models, status=status, revision=1)


def load(wid: str, in_flight: int = 0, queue: int = 0, mif: int = 4, mq: int = 4) -> WorkerLoad:
    return WorkerLoad(
        worker_id=wid,
        url=f"http://{wid}:1",
        status=S.READY,
        models=(
            ModelLoad(
                id="m",
                in_flight=in_flight,
                queue_depth=queue,
                max_in_flight=mif,
                max_queue_depth=mq,
            ),
        ),
        heartbeat_interval_s=1.0,
    )


def view(
    *records: WorkerRecord, now: float = 100.0, policy: PolicyName = "cost", **loads: WorkerLoad
) -> FleetView:
    v = FleetView(policy)
    v.set_records({r.id: r for r in records})
    for wid, wl in loads.items():
        v.heartbeat(wid, 1, 1, wl, now)
    return v


def chosen(decision: object) -> str:
    assert isinstance(decision, Choice), decision
    return decision.worker_id


def test_least_busy_wins_and_ties_go_to_the_smallest_id() -> None:
    v = view(
        rec("b"),
        rec("a"),
        rec("c"),
        policy="least_busy",
        b=load("b", 1),
        a=load("a", 1),
        c=load("c", 3),
    )
    assert chosen(v.choose("m", 100.0)) == "a"
    v.heartbeat("a", 1, 2, load("a", 2, 1), 100.0)
    assert chosen(v.choose("m", 100.0)) == "b"


def test_unknown_model_and_no_ready_replica() -> None:
    v = view(rec("a", S.PENDING), a=load("a"))
    assert v.choose("other", 100.0) == UnknownModel("other")
    assert v.choose("m", 100.0) == NoReplica("m", True, "no ready replica")
    v.set_records({"a": rec("a", S.NOT_READY)})
    assert v.choose("m", 100.0) == NoReplica("m", False, "no ready replica")


@pytest.mark.parametrize(
    ("records", "model", "serves"),
    [
        ((), "m", False),  # nobody registered
        ((rec("a"),), "m", True),
        ((rec("a"),), "other", False),
        ((rec("a", models=("x", "m")),), "m", True),  # any of a worker's models
        ((rec("a", S.PENDING),), "m", True),  # starting: known, so 503 + Retry-After, not 404
        ((rec("a", S.NOT_READY),), "m", True),
        ((rec("a", models=()), rec("b", models=("m",))), "m", True),
        ((rec("a"),), "M", False),  # names are exact
    ],
)
def test_serves_is_any_record_listing_the_model_and_agrees_with_choose(
    records: tuple[WorkerRecord, ...], model: str, serves: bool
) -> None:
    v = view(*records)
    assert v.serves(model) is serves
    assert isinstance(v.choose(model, 100.0), UnknownModel) is not serves


@pytest.mark.parametrize(
    ("why", "status", "code", "retry_after_s", "param"),
    [
        (UnknownModel("m"), 404, "model_not_found", None, "model"),
        (NoReplica("m", True, "no ready replica"), 503, "no_replica_available", 2, None),
        (NoReplica("m", False, "no ready replica"), 503, "no_replica_available", 5, None),
    ],
)
def test_each_no_choice_is_one_refusal(
    why: NoChoice, status: int, code: str, retry_after_s: int | None, param: str | None
) -> None:
    err = no_choice_error(why)
    assert (err.status, err.code, err.retry_after_s, err.param) == (
        status,
        code,
        retry_after_s,
        param,
    )
    assert "'m'" in err.message


def test_gateway_busy_and_unreachable_refusals() -> None:
    busy = gateway_busy("m", "queue_full", 3)
    assert (busy.status, busy.type, busy.code, busy.retry_after_s) == (
        503,
        "service_unavailable_error",
        "rate_limit_exceeded",
        3,
    )
    assert busy.message.startswith("the fleet is at capacity for model 'm' (its queue is full)")
    gone = upstream_unreachable("ConnectionRefusedError()")
    assert (gone.status, gone.type, gone.code) == (502, "server_error", "upstream_unreachable")
    assert gone.message.endswith("ConnectionRefusedError()")


def test_stale_heartbeat_is_unknown_not_idle() -> None:
    # "a" looked idle long ago; "b" is fresh and busier: fresh wins.
    v = view(rec("a"), rec("b"), now=90.0, a=load("a", 0))
    v.heartbeat("b", 1, 1, load("b", 3), 100.0)
    decision = v.choose("m", 100.0)
    assert chosen(decision) == "b"
    assert isinstance(decision, Choice)
    assert decision.fresh
    assert v.stale_count(100.0) == 1
    # with nothing fresh, the stale one is still usable, scored by what was last known
    only_stale = view(rec("a"), now=90.0, a=load("a", 2))
    decision = only_stale.choose("m", 100.0)
    assert isinstance(decision, Choice)
    assert (decision.worker_id, decision.score, decision.fresh) == ("a", 2, False)


def test_exactly_at_ttl_is_still_fresh() -> None:
    v = view(rec("a"), now=97.0, a=load("a"))
    assert v.is_fresh("a", 100.0)
    assert not v.is_fresh("a", 100.01)


def test_cooldown_skips_until_it_ends() -> None:
    v = view(rec("a"), rec("b"), a=load("a", 0), b=load("b", 2))
    v.busy("a", 5.0, now=100.0)
    assert chosen(v.choose("m", 104.9)) == "b"
    assert chosen(v.choose("m", 105.0)) == "a"


def test_suspect_until_next_good_heartbeat() -> None:
    v = view(rec("a"), rec("b"), a=load("a", 0), b=load("b", 2))
    v.connection_failed("a", 100.0)
    assert chosen(v.choose("m", 100.0)) == "b"
    v.heartbeat("a", 1, 2, load("a", 0), 101.0)
    assert chosen(v.choose("m", 101.0)) == "a"


def test_exclude_and_need_room() -> None:
    v = view(rec("a"), rec("b"), a=load("a", 0), b=load("b", 4, 4))  # b is full (4 + 4)
    assert chosen(v.choose("m", 100.0, exclude=frozenset({"a"}))) == "b"
    decision = v.choose("m", 100.0, exclude=frozenset({"a"}), need_room=True)
    assert isinstance(decision, NoReplica)
    assert v.has_room("a", "m")
    assert not v.has_room("b", "m")


@pytest.mark.parametrize(
    ("busy", "slots", "room"),
    [
        (0, 1, True),
        (5, 3, True),  # 5 + 3 = 8 = 4 slots + 4 queue places: just fits
        (6, 3, False),  # an n=3 request needs three places, not one
        (4, 4, True),  # all four slots taken, four queue places: an n=4 request fits
        (7, 1, True),
        (0, 9, True),  # more than its slots: it answers at once (a 400), nothing to wait for
        (8, 9, False),  # ... unless it is full
    ],
)
def test_room_counts_every_slot_a_request_takes(busy: int, slots: int, room: bool) -> None:
    v = view(rec("a"), a=load("a", min(busy, 4), max(busy - 4, 0)))
    assert v.has_room("a", "m", slots) is room
    decision = v.choose("m", 100.0, need_room=True, slots=slots)
    assert isinstance(decision, Choice) is room


def test_a_request_of_n_choices_counts_n_dispatches() -> None:
    v = view(rec("a"), rec("b"), policy="least_busy", a=load("a", 0), b=load("b", 1))
    v.dispatched_to("a", 3)  # one n=3 request: a now looks busier than b
    assert v.score("a", "m") == 3
    assert chosen(v.choose("m", 100.0)) == "b"


def test_burst_between_heartbeats_spreads_evenly() -> None:
    workers = ["w1", "w2", "w3", "w4"]
    v = view(*(rec(w) for w in workers))
    for w in workers:
        v.heartbeat(w, 1, 1, load(w), 100.0)
    counts: Counter[str] = Counter()
    for _ in range(100):
        wid = chosen(v.choose("m", 100.5))
        v.dispatched_to(wid)
        counts[wid] += 1
    assert all(24 <= counts[w] <= 26 for w in workers), counts


def test_removed_workers_are_forgotten_and_old_heartbeats_ignored() -> None:
    v = view(rec("a"), a=load("a", 1))
    assert not v.heartbeat("a", 1, 1, load("a", 9), 101.0)  # same seq: ignored
    assert v.score("a", "m") == 1
    v.set_records({})
    assert v.beats == {}
    assert v.models() == []


def test_dashboard_snapshot_shows_records_loads_ages_and_cooldowns() -> None:
    from schemas.capacity import CapacitySource, CapacityView, ModelCapacity
    from schemas.dashboard import GatewayLoad

    v = view(rec("b"), rec("a", S.NOT_READY), rec("c"), now=98.0, a=load("a", 1), b=load("b", 2))
    v.busy("b", retry_after_s=5, now=99.0)
    cap = ModelCapacity(capacity=8, source=CapacitySource.WORKER_REPORTED, workers_available=2)
    capacity = CapacityView(fleet=cap, models={"m": cap}, registry_epoch=7, registry_seq=3)
    gateway = {"m": GatewayLoad(in_flight=1, queue_depth=0, limit=8)}
    snap = v.snapshot(100.0, capacity, gateway, (7, 3), wall=1.5e9)
    assert [w.id for w in snap.workers] == ["a", "b", "c"]  # stable order for the page
    a, b, c = snap.workers
    assert (a.status, a.load[0].in_flight, a.heartbeat_age_s, a.fresh) == (
        S.NOT_READY,
        1,
        2.0,
        True,
    )
    assert b.cooling_down
    assert not a.cooling_down
    assert (c.load, c.heartbeat_age_s, c.fresh) == ((), None, False)  # never heard from
    assert snap.capacity == capacity
    assert snap.gateway == gateway
    assert (snap.registry_epoch, snap.registry_seq, snap.generated_at) == (7, 3, 1.5e9)
    later = v.snapshot(110.0, None, {}, (7, 3), wall=0.0)
    assert not later.workers[0].fresh  # 12 s > 3 x 1 s interval
    assert not later.workers[1].cooling_down  # Retry-After passed


@pytest.mark.parametrize(
    ("asked", "key", "allowed"),
    [
        (0, None, 0),  # no header: 0, whoever asks
        (5, None, 1),  # no API key (auth off): the default cap
        (1, None, 1),  # exactly the cap
        (-4, None, -4),  # going later than everyone is always allowed
        (9, "plain", 1),  # a key without a grant: the default cap
        (9, "vip", 7),  # a key's own cap, above the default
        (6, "vip", 6),
        (9, "low", -2),  # a cap below the default: even 0 is clamped
        (-5, "low", -5),
    ],
)
def test_priority_is_clamped_to_the_keys_cap(asked: int, key: str | None, allowed: int) -> None:
    caps = PriorityCaps(default=1, per_key={"vip": 7, "low": -2})
    assert caps.allowed(asked, key) == allowed


def test_priority_caps_come_from_config_and_name_only_known_keys() -> None:
    env = {
        "ROUTER_API_KEYS": "k1,k2",
        "ROUTER_MAX_PRIORITY": "2",
        "ROUTER_KEY_MAX_PRIORITY": "k1=10",
    }
    cfg = config.load([], env)
    assert (cfg.max_priority, cfg.key_max_priority) == (2, {"k1": 10})
    assert config.load([], {}).max_priority == 0  # by default nobody jumps the queue
    with pytest.raises(ConfigError, match="key_max_priority names 1 key") as err:
        config.load([], {**env, "ROUTER_KEY_MAX_PRIORITY": "k1=10,secret-k3=5"})
    assert "secret-k3" not in str(err.value)  # keys are secrets: never echoed


@pytest.mark.parametrize(
    ("body", "slots"),
    [
        (b'{"model": "m"}', 1),
        (b'{"model": "m", "n": 3}', 3),
        (b'{"model": "m", "n": 2, "best_of": 5}', 5),
        (b'{"model": "m", "n": 0}', 1),  # the worker refuses it; the router counts one
        (b'{"model": "m", "n": "3"}', 1),
        (b'{"model": "m", "best_of": 18446744073709551616}', 1),  # no overflow, no wait
        (b'{"model": "m", "n": 3.0}', 1),
    ],
)
def test_slots_a_request_takes_are_read_leniently(body: bytes, slots: int) -> None:
    assert codec.decode(body, RoutingFields).slots == slots
