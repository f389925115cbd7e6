"""Router replica choice by cost (queue wait + prefill of what a replica does not hold), its ties,
the least_busy policy, and spreading over replicas not heard from yet (startup)."""

from __future__ import annotations

import random
from collections import Counter
from typing import NamedTuple

import pytest

from schemas.kv import KvBlocks
from schemas.load import ModelLoad, WorkerLoad
from schemas.prefix import BLOCK_BYTES, block_hashes
from schemas.registry import WorkerStatus
from services.common.errors import ConfigError
from services.router import config
from services.router.core import Choice, FleetView
from services.router.policy import (
    BYTES_PER_TOKEN,
    Candidate,
    Defaults,
    PolicyName,
    Prompt,
    estimate_s,
)
from tests.helpers import ready_record as rec

NOW = 100.0
SYSTEM = b"You are a careful assistant. " * 140  # ~4 KB: 15 full blocks
LONG = Prompt.of(16 * 1024, block_hashes(b"x" * 16 * 1024))  # 4096 tokens, 64 blocks
SHORT = Prompt.of(256, ())  # 64 tokens


class Speed(NamedTuple):
    """What a worker's heartbeat says of its slots and measured rates."""

    mif: int = 4
    service_s: float | None = 1.0
    prefill: float | None = 5000.0


FAST = Speed(16, 1.0, 10_000.0)
SLOW = Speed(4, 3.0, 2_500.0)
UNMEASURED = Speed(4, None, None)
PLAIN = Speed()


def beat(wid: str, busy: int = 0, speed: Speed = PLAIN) -> WorkerLoad:
    """busy requests on the worker: its slots filled first, the rest queued."""
    running, queued = min(busy, speed.mif), max(busy - speed.mif, 0)
    model = ModelLoad(
        id="m",
        in_flight=running,
        queue_depth=queued,
        max_in_flight=speed.mif,
        max_queue_depth=64,
        service_s=speed.service_s,
        prefill_tokens_per_s=speed.prefill,
    )
    return WorkerLoad(
        worker_id=wid, url=f"http://{wid}:1", status=WorkerStatus.READY, models=(model,)
    )


def fleet(
    *beats: WorkerLoad, seed: int = 0, policy: PolicyName = "cost", unheard: tuple[str, ...] = ()
) -> FleetView:
    """Ready workers: those with a heartbeat (at NOW) and those not heard from yet."""
    v = FleetView(policy, draw=random.Random(seed).random)
    v.set_records({w: rec(w) for w in (*(b.worker_id for b in beats), *unheard)})
    for load in beats:
        v.heartbeat(load.worker_id, 1, 1, load, NOW)
    return v


def holds(v: FleetView, wid: str, blocks: tuple[int, ...]) -> None:
    v.caches.apply(1, 1, KvBlocks(worker_id=wid, model="m", stored=blocks, full=True))


def chosen(decision: object) -> str:
    assert isinstance(decision, Choice), decision
    return decision.worker_id


@pytest.mark.parametrize(
    ("a", "b", "prompt", "winner"),
    [
        # equal load, both with free slots: the faster prefill wins
        (beat("a", 2, FAST), beat("b", 2, SLOW), LONG, "a"),
        (beat("a", 2, SLOW), beat("b", 2, FAST), LONG, "b"),
        # a saturated fast replica (16 running, 8 queued: 0.56 s to a slot) loses to an idle slow
        # one when prefill is small ...
        (beat("a", 24, FAST), beat("b", 0, SLOW), SHORT, "b"),
        # ... but not when the slow one's prefill of a long prompt costs more than the wait
        (beat("a", 24, FAST), beat("b", 0, SLOW), LONG, "a"),
        # a slow replica with a queue loses to a fast one with free slots (the 70 % case)
        (beat("a", 10, FAST), beat("b", 5, SLOW), SHORT, "a"),
        # equal speed: fewer waiting wins once slots are full
        (beat("a", 6), beat("b", 5), SHORT, "b"),
    ],
)
def test_cost_weighs_speed_against_load(
    a: WorkerLoad, b: WorkerLoad, prompt: Prompt, winner: str
) -> None:
    v = fleet(a, b)
    assert chosen(v.choose("m", NOW, prompt=prompt)) == winner


def test_prefix_holder_wins_at_equal_load_and_loses_when_saturated() -> None:
    text = SYSTEM + b"q" * 40  # a shared system prompt and a question
    prompt = Prompt.of(len(text), block_hashes(text))
    system = block_hashes(SYSTEM)
    assert len(system) == len(SYSTEM) // BLOCK_BYTES == 15
    for seed in range(20):  # not a lucky draw: every seed
        v = fleet(beat("a", 1), beat("b", 1), beat("c", 1), seed=seed)
        holds(v, "b", system)
        assert v.candidate("b", "m", prompt).cached_blocks == 15
        assert chosen(v.choose("m", NOW, prompt=prompt)) == "b"
        # b full (4 running, 8 queued): 9 x 1 s / 4 of queue wait outweighs 0.2 s of prefill
        v.heartbeat("b", 1, 2, beat("b", 12), NOW)
        assert chosen(v.choose("m", NOW, prompt=prompt)) in ("a", "c")


def test_a_partial_prefix_counts_its_leading_blocks_only() -> None:
    v = fleet(beat("a"), beat("b"))
    blocks = block_hashes(SYSTEM)
    holds(v, "a", blocks[:5] + blocks[6:])  # a hole at block 5: only 5 count
    holds(v, "b", blocks[:10])
    assert v.candidate("a", "m", Prompt.of(len(SYSTEM), blocks)).cached_blocks == 5
    assert chosen(v.choose("m", NOW, prompt=Prompt.of(len(SYSTEM), blocks))) == "b"


def test_dispatches_since_the_heartbeat_count_as_load() -> None:
    v = fleet(beat("a", 0, Speed(mif=2)), beat("b", 0, Speed(mif=2)))
    holds(v, "a", LONG.blocks)  # a is by far the cheapest ...
    picks = []
    for _ in range(6):
        wid = chosen(v.choose("m", NOW, prompt=LONG))
        v.dispatched_to(wid)
        picks.append(wid)
    # ... until what this router sent it fills its slots and queue: then b's prefill is cheaper
    assert picks[:3] == ["a", "a", "a"]
    assert "b" in picks


def test_unknown_rates_use_the_fleet_defaults_never_zero() -> None:
    d = Defaults()
    unmeasured = Candidate(worker_id="u", busy=5, max_in_flight=4)
    # (5 - 4 + 1) x 1 s / 4 + 4096 tokens / 5000 tokens/s
    assert estimate_s(unmeasured, LONG, d) == pytest.approx(2 * 1.0 / 4 + 4096 / 5000)
    zero = Candidate(worker_id="z", busy=5, max_in_flight=4, service_s=0.0)
    assert estimate_s(zero, LONG, d) == estimate_s(unmeasured, LONG, d)  # 0 is "not measured"
    v = fleet(beat("a", 1, UNMEASURED), beat("b", 0, UNMEASURED))
    decision = v.choose("m", NOW, prompt=LONG)
    assert isinstance(decision, Choice)
    assert decision.estimate_s == pytest.approx(4096 / 5000)  # nobody measured: the defaults


def test_an_unmeasured_replica_is_taken_to_be_like_its_measured_peers() -> None:
    slow = Speed(4, 4.0, 1000.0)
    v = fleet(beat("a", 3, UNMEASURED), beat("b", 4, slow), beat("c", 4, slow))
    # a: no wait, 4096 / 1000 s (its peers' rate, not the 5000/s default); b, c: 1 s of queue
    # wait (their measured 4 s / 4 slots) on top of the same prefill
    decision = v.choose("m", NOW, prompt=LONG)
    assert isinstance(decision, Choice)
    assert decision.worker_id == "a"
    assert decision.estimate_s == pytest.approx(4.096)
    v.heartbeat("b", 1, 2, beat("b", 1, Speed(4, 1.0, 20_000.0)), NOW)
    assert chosen(v.choose("m", NOW, prompt=LONG)) == "b"  # a measured 20000/s beats a guess


def test_prompt_tokens_are_estimated_from_bytes() -> None:
    assert Prompt.of(16 * 1024, ()).tokens == 16 * 1024 // BYTES_PER_TOKEN == 4096
    assert Prompt.of(3, ()).tokens == 0


@pytest.mark.parametrize(
    ("busy", "wait_s"),
    [(0, 0.0), (3, 0.0), (4, 0.5), (5, 1.0), (11, 4.0)],  # mif 4, service 2 s: a slot per 0.5 s
)
def test_queue_wait(busy: int, wait_s: float) -> None:
    c = Candidate(worker_id="w", busy=busy, max_in_flight=4, service_s=2.0)
    assert estimate_s(c, Prompt(), Defaults()) == pytest.approx(wait_s)


def test_ties_go_to_the_injected_randomness_and_seeds_differ() -> None:
    def pick(seed: int) -> str:
        v = fleet(*(beat(w, 1) for w in "abcd"), seed=seed)
        return chosen(v.choose("m", NOW, prompt=LONG))

    assert pick(7) == pick(7)  # the draw decides, nothing else
    assert len({pick(seed) for seed in range(40)}) == 4  # several routers do not herd
    # within the tolerance (5 %) is a tie too; the less busy of the tied wins
    v = fleet(beat("a", 2, Speed(prefill=5000.0)), beat("b", 1, Speed(prefill=4900.0)))
    assert chosen(v.choose("m", NOW, prompt=LONG)) == "b"


def test_least_busy_policy_is_unchanged() -> None:
    # the cost policy would pick b (it holds the prompt); least_busy looks at counts and ids only
    v = fleet(beat("b", 1, FAST), beat("a", 1, SLOW), policy="least_busy")
    holds(v, "b", LONG.blocks)
    assert chosen(v.choose("m", NOW, prompt=LONG)) == "a"
    v.heartbeat("a", 1, 2, beat("a", 2, SLOW), NOW)
    assert chosen(v.choose("m", NOW, prompt=LONG)) == "b"
    decision = v.choose("m", NOW, prompt=LONG)
    assert isinstance(decision, Choice)
    assert decision.estimate_s is None


@pytest.mark.parametrize("policy", ["cost", "least_busy"])
def test_startup_spreads_over_replicas_not_heard_from(policy: PolicyName) -> None:
    v = fleet(beat("a", 0, FAST), seed=3, policy=policy, unheard=("b", "c"))
    counts: Counter[str] = Counter()
    for _ in range(30):
        wid = chosen(v.choose("m", NOW, prompt=LONG))
        v.dispatched_to(wid)
        counts[wid] += 1
    assert counts == {"a": 10, "b": 10, "c": 10}  # not 30 on the one it knows
    # a heartbeat from each: the estimate takes over
    v.heartbeat("b", 1, 1, beat("b", 0, SLOW), NOW)
    v.heartbeat("c", 1, 1, beat("c", 0, SLOW), NOW)
    v.heartbeat("a", 1, 2, beat("a", 0, FAST), NOW)
    assert chosen(v.choose("m", NOW, prompt=LONG)) == "a"


def test_known_load_counts_against_replicas_not_heard_from() -> None:
    v = fleet(beat("a", 3), unheard=("b",))
    assert chosen(v.choose("m", NOW)) == "b"
    for _ in range(4):
        v.dispatched_to("b")
    assert chosen(v.choose("m", NOW)) == "a"  # 3 running on a, 4 sent to b


def test_a_retry_may_go_to_a_replica_not_heard_from() -> None:
    v = fleet(beat("a", 4 + 64), unheard=("b",))  # a is full (slots and queue)
    assert not v.has_room("a", "m")
    assert v.has_room("b", "m")
    assert (v.ready_count(), v.waiting_for(NOW)) == (2, 1)  # /health: 1 not heard from
    assert chosen(v.choose("m", NOW, need_room=True)) == "b"


def test_workers_without_heartbeats_by_design_are_not_spread_over() -> None:
    v = fleet(beat("a", 3))
    v.set_records({"a": rec("a"), "x": rec("x", {"switchboard.heartbeat": "off"})})
    assert all(chosen(v.choose("m", NOW)) == "a" for _ in range(5))  # only when nothing else
    assert chosen(v.choose("m", NOW, exclude=frozenset({"a"}))) == "x"
    # /health's count of Ready workers without a heartbeat leaves it out: `up` waits for none
    assert (v.stale_count(NOW), v.waiting_for(NOW)) == (1, 0)


def test_stale_heartbeats_stay_unknown_not_idle_under_cost() -> None:
    v = fleet(beat("a", 0), beat("b", 3))
    v.heartbeat("b", 1, 2, beat("b", 3), NOW + 10)  # a's heartbeat is now 10 s old
    assert chosen(v.choose("m", NOW + 10, prompt=LONG)) == "b"
    assert v.stale_count(NOW + 10) == 1


def test_the_policy_is_chosen_by_config_and_a_wrong_name_names_the_flag() -> None:
    assert config.load([], {}).policy == "cost"
    assert config.load([], {"ROUTER_POLICY": "least_busy"}).policy == "least_busy"
    assert config.load(["--policy", "least_busy"], {}).policy == "least_busy"
    with pytest.raises(ConfigError, match="ROUTER_POLICY / --policy"):
        config.load([], {"ROUTER_POLICY": "round_robin"})
