"""SequenceTracker, Sequencer and latest-wins: every verdict, table-driven."""

from __future__ import annotations

import pytest

from services.common.seq import (
    Duplicate,
    Gap,
    InOrder,
    Latest,
    NewEpoch,
    Sequencer,
    SequenceTracker,
    Verdict,
    is_newer,
)

# (known position or None, observed (epoch, seq), expected verdict, position afterwards)
OBSERVE_CASES: list[
    tuple[tuple[int, int] | None, tuple[int, int], Verdict, tuple[int, int] | None]
] = [
    # first message ever seen
    (None, (7, 1), InOrder(seq=1), (7, 1)),
    (None, (7, 5), NewEpoch(epoch=7, known_epoch=None), None),
    # in order
    ((7, 4), (7, 5), InOrder(seq=5), (7, 5)),
    ((7, 0), (7, 1), InOrder(seq=1), (7, 1)),
    # duplicate and old
    ((7, 5), (7, 5), Duplicate(seq=5, last=5), (7, 5)),
    ((7, 5), (7, 2), Duplicate(seq=2, last=5), (7, 5)),
    # gap
    ((7, 5), (7, 7), Gap(expected=6, got=7), (7, 5)),
    ((7, 0), (7, 3), Gap(expected=1, got=3), (7, 0)),
    # new epoch, newer or older, even with a seq that would be in order
    ((7, 5), (8, 6), NewEpoch(epoch=8, known_epoch=7), (7, 5)),
    ((7, 5), (6, 1), NewEpoch(epoch=6, known_epoch=7), (7, 5)),
]


@pytest.mark.parametrize(("known", "observed", "verdict", "after"), OBSERVE_CASES)
def test_observe(
    known: tuple[int, int] | None,
    observed: tuple[int, int],
    verdict: Verdict,
    after: tuple[int, int] | None,
) -> None:
    tracker = SequenceTracker()
    if known is not None:
        tracker.reset("registry", *known)
    assert tracker.observe("registry", *observed) == verdict
    assert tracker.position("registry") == after


BEACON_CASES: list[tuple[tuple[int, int] | None, tuple[int, int], Verdict]] = [
    (None, (7, 3), NewEpoch(epoch=7, known_epoch=None)),
    ((7, 3), (7, 3), InOrder(seq=3)),
    ((7, 3), (7, 2), Duplicate(seq=2, last=3)),
    ((7, 3), (7, 4), Gap(expected=4, got=4)),  # the last event was lost
    ((7, 3), (9, 3), NewEpoch(epoch=9, known_epoch=7)),
    ((7, 0), (7, 0), InOrder(seq=0)),
]


@pytest.mark.parametrize(("known", "observed", "verdict"), BEACON_CASES)
def test_observe_beacon_never_advances(
    known: tuple[int, int] | None, observed: tuple[int, int], verdict: Verdict
) -> None:
    tracker = SequenceTracker()
    if known is not None:
        tracker.reset("registry", *known)
    assert tracker.observe_beacon("registry", *observed) == verdict
    assert tracker.position("registry") == known


def test_sources_are_independent_and_forget_restarts() -> None:
    tracker = SequenceTracker()
    assert tracker.observe("a", 1, 1) == InOrder(seq=1)
    assert tracker.observe("b", 1, 1) == InOrder(seq=1)
    assert tracker.observe("a", 1, 2) == InOrder(seq=2)
    assert tracker.observe("b", 1, 3) == Gap(expected=2, got=3)
    tracker.forget("a")
    assert tracker.position("a") is None
    assert tracker.observe("a", 1, 3) == NewEpoch(epoch=1, known_epoch=None)


def test_gap_then_snapshot_reset_then_buffered_events() -> None:
    tracker = SequenceTracker()
    tracker.reset("r", 1, 10)
    assert isinstance(tracker.observe("r", 1, 13), Gap)
    tracker.reset("r", 1, 12)  # the snapshot included event 12
    assert tracker.observe("r", 1, 12) == Duplicate(seq=12, last=12)
    assert tracker.observe("r", 1, 13) == InOrder(seq=13)


def test_sequencer_stamps_contiguously_and_beacons_repeat() -> None:
    seqr = Sequencer("registry", epoch=42)
    assert seqr.beacon("b", now=1.0).seq == 0
    envs = [seqr.stamp(i, now=2.0) for i in range(3)]
    assert [e.seq for e in envs] == [1, 2, 3]
    assert {e.epoch for e in envs} == {42}
    assert seqr.beacon("b", now=3.0).seq == 3
    resumed = Sequencer("registry", epoch=42, seq=3)
    assert resumed.stamp("x", now=4.0).seq == 4


@pytest.mark.parametrize(
    ("known", "epoch", "seq", "newer"),
    [
        (None, 1, 1, True),
        ((1, 5), 1, 6, True),
        ((1, 5), 1, 5, False),
        ((1, 5), 1, 4, False),
        ((1, 5), 2, 1, True),  # restarted process: later epoch wins even with a small seq
        ((2, 1), 1, 99, False),  # a late message from the previous process
    ],
)
def test_is_newer(known: tuple[int, int] | None, epoch: int, seq: int, newer: bool) -> None:
    assert is_newer(known, epoch, seq) is newer


def test_latest_keeps_only_newer() -> None:
    latest: Latest[str] = Latest()
    assert latest.offer("w1", 1, 2, "b", now=10.0)
    assert not latest.offer("w1", 1, 1, "a", now=11.0)
    assert latest.get("w1") == (10.0, "b")
    assert latest.offer("w1", 2, 1, "c", now=12.0)
    assert latest.get("w1") == (12.0, "c")
    latest.drop("w1")
    assert latest.get("w1") is None
    assert latest.sources() == []
