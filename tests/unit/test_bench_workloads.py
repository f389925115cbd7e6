"""The routing benchmark's workloads: one seed, one schedule; rates, lengths, shapes in bounds."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from bench.loadgen import Outcome, Slo, content_of, summarize
from bench.workloads import (
    CHAT_SYSTEM_WORDS,
    FLEET,
    OUTPUT_MIX,
    PROMPT_MIX,
    SYSTEM_WORDS,
    WORKLOADS,
    SimWorker,
    bursty,
    bursty_arrivals,
    fleet_capacity_rps,
    mean_of,
    scaled,
    shared_prefix,
    two_routers,
)

OUT_LOW, OUT_HIGH = min(b[1] for b in OUTPUT_MIX), max(b[2] for b in OUTPUT_MIX)


def words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_one_seed_one_schedule(name: str) -> None:
    make = WORKLOADS[name].make
    assert make(7, 30.0, 10.0) == make(7, 30.0, 10.0)
    assert make(7, 30.0, 10.0) != make(8, 30.0, 10.0)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_times_ordered_inside_the_window_and_outputs_in_bounds(name: str) -> None:
    schedule = WORKLOADS[name].make(3, 60.0, 12.0)
    times = [r.at_s for r in schedule]
    assert times == sorted(times)
    assert all(0.0 <= t < 60.0 for t in times)
    assert all(OUT_LOW <= r.max_tokens <= OUT_HIGH for r in schedule)
    assert {r.instance for r in schedule} <= set(range(WORKLOADS[name].instances))


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_mean_rate_is_the_asked_rate(name: str) -> None:
    duration_s, rate = 600.0, 10.0
    rates = [len(WORKLOADS[name].make(seed, duration_s, rate)) / duration_s for seed in range(3)]
    assert statistics.mean(rates) == pytest.approx(rate, rel=0.15)


def test_bursty_arrivals_are_burstier_than_poisson() -> None:
    """Counts per second vary more than a Poisson process's (whose variance equals its mean)."""
    times = bursty_arrivals(random.Random(1), 600.0, 20.0)
    counts = [0] * 600
    for t in times:
        counts[int(t)] += 1
    assert statistics.variance(counts) / statistics.mean(counts) > 2.0


def test_bursty_prompts_come_from_the_prompt_mix() -> None:
    low, high = min(b[1] for b in PROMPT_MIX), max(b[2] for b in PROMPT_MIX)
    schedule = bursty(2, 120.0, 10.0)
    assert all(low <= words(r.messages[-1].content) <= high for r in schedule)
    assert {r.kind for r in schedule} == {"burst"}
    # Lone requests: no two share a prompt.
    assert len({r.messages for r in schedule}) == len(schedule)


def test_groups_share_one_long_system_prompt() -> None:
    schedule = [r for r in shared_prefix(4, 120.0, 10.0, groups=3) if r.kind == "group"]
    prompts = {r.session: set() for r in schedule}  # type: dict[str, set[str]]
    for r in schedule:
        assert r.messages[0].role == "system"
        prompts[r.session].add(r.messages[0].content)
    assert set(prompts) == {"g0", "g1", "g2"}
    assert all(len(p) == 1 for p in prompts.values())
    assert all(SYSTEM_WORDS[0] <= words(next(iter(p))) <= SYSTEM_WORDS[1] for p in prompts.values())


def test_conversations_resend_their_history() -> None:
    turns: dict[str, list[tuple[float, int]]] = {}
    schedule = shared_prefix(5, 120.0, 10.0)
    for i, r in enumerate(schedule):
        if r.kind == "turn":
            turns.setdefault(r.session, []).append((r.at_s, i))
    assert sum(len(t) > 1 for t in turns.values()) > 10
    for chat in turns.values():
        for (_, i), (_, j) in itertools.pairwise(chat):
            before, after = schedule[i].messages, schedule[j].messages
            assert after[: len(before)] == before  # the whole earlier turn, resent
            assert [m.role for m in after[len(before) :]] == ["assistant", "user"]
            low, high = CHAT_SYSTEM_WORDS
            assert low <= words(after[0].content) <= high


def test_two_routers_alternate_and_carry_both_workloads() -> None:
    schedule = two_routers(6, 120.0, 10.0)
    assert [r.instance for r in schedule] == [i % 2 for i in range(len(schedule))]
    kinds = {r.kind for r in schedule}
    assert kinds == {"burst", "group", "turn"}


def test_capacity_of_one_worker_by_hand() -> None:
    worker = SimWorker("w", tokens_per_s=100.0, batch=4, ttft_s=0.1, slowdown_per_seq=0.0)
    # 4 sequences, each 0.1 s to the first token and 9 more steps of 10 ms: 4 / 0.19 s
    assert worker.capacity_rps(10.0) == pytest.approx(4 / 0.19)
    assert mean_of(((1.0, 10, 20), (1.0, 30, 40))) == pytest.approx(25.0)


def test_fast_workers_hold_most_of_the_fleet_capacity() -> None:
    fast = [w for w in FLEET if w.name.startswith("fast")]
    assert fleet_capacity_rps(fast) / fleet_capacity_rps(FLEET) > 0.8


def test_a_scaled_fleet_is_as_much_faster_and_keeps_its_slots() -> None:
    faster = scaled(FLEET, 4.0)
    assert [w.tokens_per_s for w in faster] == [w.tokens_per_s * 4 for w in FLEET]
    assert [w.batch for w in faster] == [w.batch for w in FLEET]
    assert fleet_capacity_rps(faster) > 3 * fleet_capacity_rps(FLEET)


def test_goodput_counts_completed_requests_within_both_slos() -> None:
    outcomes = [
        Outcome("ok", 200, ttft_s=0.5, e2e_s=2.0, itl_s=0.02, tokens=50),
        Outcome("ok", 200, ttft_s=1.5, e2e_s=3.0, itl_s=0.02, tokens=50),  # TTFT too long
        Outcome("ok", 200, ttft_s=0.5, e2e_s=9.0, itl_s=0.08, tokens=50),  # tokens too slow
        Outcome("refused", 503),
        Outcome("error", detail="no token after 15 s"),
    ]
    summary = summarize(outcomes, duration_s=2.0, slo=Slo(ttft_s=1.0, itl_s=0.05))
    assert (summary.sent, summary.completed, summary.refused, summary.errors) == (5, 3, 1, 1)
    assert summary.goodput_rps == pytest.approx(0.5)
    assert summary.throughput_rps == pytest.approx(1.5)
    assert summary.p50_ttft_s == 0.5
    assert summary.p99_ttft_s == 1.5
    assert summary.first_error == "no token after 15 s"


def test_stream_events_give_their_text_until_done() -> None:
    role = b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}'
    assert content_of(role) == ""
    assert content_of(b'data: {"choices":[{"delta":{"content":" so"}}]}') == " so"
    assert content_of(b"data: [DONE]") is None
    with pytest.raises(ValueError, match="busy"):
        content_of(b'data: {"error":{"message":"busy"}}')
