"""What the router knows of workers' prefix caches: full snapshots, deltas in order, gaps and new
epochs (unknown until the next snapshot), the cap, and forgetting a worker."""

from __future__ import annotations

import pytest

from schemas.kv import KvBlocks
from schemas.registry import WorkerRecord, WorkerStatus
from services.router.core import FleetView
from services.router.kv import Applied, PrefixCaches


def ev(
    stored: tuple[int, ...] = (),
    evicted: tuple[int, ...] = (),
    full: bool = False,
    model: str = "m",
    worker: str = "w",
) -> KvBlocks:
    return KvBlocks(worker_id=worker, model=model, stored=stored, evicted=evicted, full=full)


def held(c: PrefixCaches, model: str = "m", worker: str = "w") -> list[int]:
    return list(c.held(worker, model))


def test_full_snapshot_then_deltas_in_order() -> None:
    c = PrefixCaches()
    assert c.apply(5, 1, ev((1, 2, 3), full=True)) is Applied.APPLIED
    assert c.apply(5, 2, ev(stored=(4,), evicted=(1,))) is Applied.APPLIED
    assert held(c) == [2, 3, 4]
    # evicted applies first: a block evicted and stored again in one event is held, as newest
    assert c.apply(5, 3, ev(stored=(2,), evicted=(2, 3))) is Applied.APPLIED
    assert held(c) == [4, 2]
    assert c.apply(5, 4, ev(stored=(9,), full=True)) is Applied.APPLIED  # full replaces
    assert held(c) == [9]
    assert c.apply(5, 4, ev(stored=(7,))) is Applied.DUPLICATE
    assert held(c) == [9]


def test_models_are_kept_apart_and_a_delta_needs_its_models_snapshot() -> None:
    c = PrefixCaches()
    c.apply(1, 1, ev((1,), full=True, model="a"))
    assert c.apply(1, 2, ev((2,), model="b")) is Applied.UNKNOWN  # b never snapshotted
    assert (held(c, "a"), held(c, "b")) == ([1], [])
    c.apply(1, 3, ev((), full=True, model="b"))
    c.apply(1, 4, ev((2,), model="b"))
    assert (held(c, "a"), held(c, "b")) == ([1], [2])


@pytest.mark.parametrize(
    ("epoch", "seq"),
    [(1, 4), (2, 3)],  # a gap (seq 3 lost) / a new epoch (the worker restarted)
    ids=["gap", "new-epoch"],
)
def test_a_lost_event_makes_the_cache_unknown_until_the_next_snapshot(epoch: int, seq: int) -> None:
    c = PrefixCaches()
    c.apply(1, 1, ev((1, 2), full=True, model="a"))
    c.apply(1, 2, ev((5,), full=True, model="b"))
    assert c.apply(epoch, seq, ev((3,), model="a")) is Applied.RESYNC
    assert (held(c, "a"), held(c, "b")) == ([], [])  # unknown is empty, never stale truth
    assert c.apply(epoch, seq + 1, ev((4,), model="a")) is Applied.UNKNOWN
    assert held(c, "a") == []
    assert c.apply(epoch, seq + 2, ev((1, 2, 3, 4), full=True, model="a")) is Applied.APPLIED
    assert c.apply(epoch, seq + 3, ev((6,), model="a")) is Applied.APPLIED
    assert (held(c, "a"), held(c, "b")) == ([1, 2, 3, 4, 6], [])  # b waits for its own


def test_joining_late_with_a_snapshot_applies_it() -> None:
    c = PrefixCaches()
    assert c.apply(1, 40, ev((7, 8), full=True)) is Applied.RESYNC
    assert held(c) == [7, 8]
    assert c.apply(1, 41, ev((9,))) is Applied.APPLIED
    assert held(c) == [7, 8, 9]


def test_the_cap_drops_the_oldest_blocks() -> None:
    c = PrefixCaches(cap=3)
    c.apply(1, 1, ev((1, 2, 3, 4, 5), full=True))
    assert held(c) == [3, 4, 5]
    c.apply(1, 2, ev((3, 6)))  # 3 stored again: newest; 4 is now the oldest
    assert held(c) == [5, 3, 6]


def test_workers_are_kept_apart_and_forgotten_with_their_record() -> None:
    v = FleetView()
    record = WorkerRecord(
        id="w", url="http://w:1", models=("m",), status=WorkerStatus.READY, revision=1
    )
    other = WorkerRecord(
        id="x", url="http://x:1", models=("m",), status=WorkerStatus.READY, revision=1
    )
    v.set_records({"w": record, "x": other})
    v.caches.apply(1, 1, ev((1,), full=True))
    v.caches.apply(3, 1, ev((2,), full=True, worker="x"))
    assert (list(v.caches.held("w", "m")), list(v.caches.held("x", "m"))) == ([1], [2])
    v.set_records({"x": other})
    assert list(v.caches.held("w", "m")) == []
    assert v.caches.tracker.position("w") is None  # a new record starts from its snapshot
    assert list(v.caches.held("x", "m")) == [2]


def test_the_reverse_index_follows_snapshots_deltas_the_cap_resyncs_and_forgetting() -> None:
    c = PrefixCaches(cap=3)
    c.apply(1, 1, ev((1, 2), full=True))
    c.apply(1, 1, ev((2, 5), full=True, worker="x"))
    assert (c.holding("m", 1), c.holding("m", 2), c.holding("other", 2)) == (
        {"w"},
        {"w", "x"},
        set(),
    )
    c.apply(1, 2, ev(stored=(3, 4, 6), evicted=(2,)))  # 2 evicted; the cap then drops 1
    assert (c.holding("m", 1), c.holding("m", 2), c.holding("m", 4)) == (set(), {"x"}, {"w"})
    c.apply(1, 3, ev((9,), full=True))  # a snapshot replaces: 3, 4 and 6 go, 9 comes
    assert (c.holding("m", 3), c.holding("m", 9)) == (set(), {"w"})
    c.apply(2, 1, ev((7,)))  # a new epoch: everything known of w dropped
    assert c.holding("m", 9) == set()
    c.forget("x")
    assert c.holders["m"] == {}
