"""The router's per-model index of replicas, by tier, profile and busy count. Pure, no I/O.

A replica is indexed under a model while it is Ready, lists the model, is not cooling down after
a Retry-After and is not suspect (core.FleetView keeps this true as its inputs change, and at the
time of its last look at the clock, lazily: see core.py). Where it sits:
- tier: 0 = the pool's first choice (a fresh heartbeat, or never heard from and meant to send
  heartbeats), 1 = used only when tier 0 has no usable replica (stale heartbeat, heartbeats off);
- profile: everything but busy that the cost estimate and room depend on (its heartbeat's slots,
  queue places and measured rates; whether its load is known): replicas of one profile with the
  same busy count are interchangeable, and their estimate and room are monotone in busy;
- busy: its score (core.FleetView.score).

Each (tier, profile) group keeps its busy counts sorted and, per count, the ids sorted, so the
least busy replica of a profile is its first level and a random pick among equals is an index.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from services.router.table import Table


class Profile(NamedTuple):
    """What a replica's estimate and room depend on besides busy (and cached blocks)."""

    known: bool  # its heartbeat gives its load for the model
    heard: bool  # it has sent a heartbeat (else its room is never in doubt)
    max_in_flight: int = 1
    max_queue_depth: int = 0
    service_s: float | None = None
    prefill_tokens_per_s: float | None = None

    def room(self, busy: int, slots: int) -> bool:
        """core.FleetView.has_room, for a replica of this profile with this busy count."""
        if not self.heard:
            return True
        if not self.known:
            return False
        need = slots if slots <= self.max_in_flight else 1
        return busy + need <= self.max_in_flight + self.max_queue_depth


class Slot(NamedTuple):
    """Where one replica sits in one model's index."""

    tier: int
    profile: Profile
    busy: int


class Group:
    """One profile's replicas in one tier: busy counts ascending, ids sorted per count."""

    __slots__ = ("ids", "levels")

    def __init__(self) -> None:
        self.levels: list[int] = []
        self.ids: dict[int, list[str]] = {}

    def add(self, busy: int, worker_id: str) -> None:
        ids = self.ids.get(busy)
        if ids is None:
            insort(self.levels, busy)
            ids = self.ids[busy] = []
        insort(ids, worker_id)

    def remove(self, busy: int, worker_id: str) -> None:
        ids = self.ids[busy]
        del ids[bisect_left(ids, worker_id)]
        if not ids:
            del self.ids[busy]
            del self.levels[bisect_left(self.levels, busy)]

    def first(self, skip: frozenset[str] | set[str]) -> int | None:
        """The least busy count with a replica not in `skip` (few: a request's tried replicas
        and its prefix holders), or None."""
        for busy in self.levels:
            ids = self.ids[busy]
            if len(ids) > len(skip) or any(w not in skip for w in ids):
                return busy
        return None


class ModelIndex:
    """One model's indexed replicas; their columns too (table.py), once vector.py reads them."""

    __slots__ = ("slots", "table", "tiers")

    def __init__(self) -> None:
        self.tiers: tuple[dict[Profile, Group], dict[Profile, Group]] = ({}, {})
        self.slots: dict[str, Slot] = {}
        self.table: Table | None = None

    def add(self, worker_id: str, slot: Slot) -> None:
        groups = self.tiers[slot.tier]
        group = groups.get(slot.profile)
        if group is None:
            group = groups[slot.profile] = Group()
        group.add(slot.busy, worker_id)
        self.slots[worker_id] = slot
        if self.table is not None:
            self.table.set(worker_id, slot)

    def remove(self, worker_id: str) -> None:
        slot = self.slots.pop(worker_id)
        groups = self.tiers[slot.tier]
        group = groups[slot.profile]
        group.remove(slot.busy, worker_id)
        if not group.levels:
            del groups[slot.profile]
        if self.table is not None:
            self.table.clear(worker_id, slot)


def nth(ids: list[str], skip: frozenset[str] | set[str], n: int) -> str:
    """The n-th (0-based) id of sorted `ids` leaving out those in `skip`."""
    at = n
    for index in sorted(bisect_left(ids, w) for w in skip if contains(ids, w)):
        if index <= at:
            at += 1
        else:
            break
    return ids[at]


def contains(ids: list[str], w: str) -> bool:
    """Sorted `ids` holds w (in O(log n))."""
    i = bisect_left(ids, w)
    return i < len(ids) and ids[i] == w


def pick(
    groups: list[list[str]], skip: frozenset[str] | set[str], singles: list[str], n: int
) -> str:
    """The n-th id, in sorted order, of the union of `groups` (sorted, less `skip`) and
    `singles` (none of them in a group unless skipped there). One group: O(|skip| + |singles|)
    bisections; several (replicas of different profiles tied): merged by a sort."""
    if len(groups) > 1:
        merged = sorted([w for ids in groups for w in ids if w not in skip] + singles)
        return merged[n]
    if not groups:
        return sorted(singles)[n]
    ids = groups[0]
    before = 0  # singles placed before the answer so far
    for single in sorted(singles):
        # its rank in the union: the group's members below it, less skipped ones, plus singles
        below = bisect_left(ids, single) - sum(1 for w in skip if w < single and contains(ids, w))
        if below + before == n:
            return single
        if below + before > n:
            break
        before += 1
    return nth(ids, skip, n - before)


def size(groups: list[list[str]], skip: frozenset[str] | set[str], singles: list[str]) -> int:
    """How many ids `pick` chooses among."""
    return sum(len(ids) - sum(1 for w in skip if contains(ids, w)) for ids in groups) + len(singles)


class Timeline:
    """When indexed facts lapse (a heartbeat going stale, a cooldown ending), in time order, so
    the index is brought to `now` by what lapsed since its last look (`at`), not by a scan."""

    def __init__(self) -> None:
        self.at = 0.0
        self.stale: list[tuple[float, str]] = []  # (fresh until, worker): stale once past it
        self.cool: list[tuple[float, str]] = []  # (cooling until, worker): usable from then on

    def lapses(self, when: float, worker_id: str, *, stale: bool) -> None:
        """A fact about the worker lapses at `when`: its heartbeat (stale) or its cooldown."""
        heappush(self.stale if stale else self.cool, (when, worker_id))

    def advance(self, now: float) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
        """What lapsed by `now` (the caller checks each is still current). Never backwards."""
        self.at = max(self.at, now)
        stale: list[tuple[float, str]] = []
        while self.stale and self.stale[0][0] < now:
            stale.append(heappop(self.stale))
        cool: list[tuple[float, str]] = []
        while self.cool and self.cool[0][0] <= now:
            cool.append(heappop(self.cool))
        return stale, cool

    def restart(
        self, now: float, stale: list[tuple[float, str]], cool: list[tuple[float, str]]
    ) -> None:
        """Time went back (only a caller's clock out of order does that): start again at now."""
        self.at, self.stale, self.cool = now, stale, cool
        heapify(self.stale)
        heapify(self.cool)
