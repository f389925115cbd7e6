"""One model's indexed replicas as columns (a struct of numpy arrays), for vector.py. Pure, no I/O.

A row per worker serving the model (its registry records), ids sorted (so "the n-th of a set, by
id" is the n-th set position), kept in step with index.ModelIndex by its add and remove: a
replica not indexed (not Ready, cooling down, suspect) keeps its row (tier ABSENT), so a cooldown
or a suspicion costs no reshuffle. The rows are rebuilt (vector.table_of) only when the model's
records name other workers than the rows do, or an id without a row was indexed.
What a query needs besides the rows' own fields is precomputed per row: the queue wait and the
prefill rate at the replica's own measured rates (the fleet default where it has none), and its
free places (room), so a choice among measured replicas costs a few array operations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from services.router.index import Profile, Slot
from services.router.policy import Defaults

ABSENT = 2  # the tier of a row whose replica is not indexed now
ALWAYS = 1 << 40  # free places of a replica never heard from: it always has room
NEVER = -(1 << 40)  # ... of one heard from whose load for the model is unknown: never
LIVE, UNHEARD, UNKNOWN, TIMED, RATED = range(5)  # per-tier counts (see Table.counts)

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


class Table:
    """Columns of one model's replicas, a row per id (sorted)."""

    def __init__(self, ids: Iterable[str], slots: dict[str, Slot], defaults: Defaults) -> None:
        self.defaults = defaults
        self.ids = sorted(ids)
        self.pos = {w: i for i, w in enumerate(self.ids)}
        n = len(self.ids)
        self.tier = np.full(n, ABSENT, np.int8)
        self.busy: Ints = np.zeros(n, np.int64)
        self.mif: Ints = np.ones(n, np.int64)  # max_in_flight (1 when unknown, as Candidate)
        self.free: Ints = np.zeros(n, np.int64)  # in-flight and queue places left (ALWAYS, NEVER)
        self.heard: Bools = np.zeros(n, np.bool_)
        self.known: Bools = np.zeros(n, np.bool_)
        self.service: Floats = np.zeros(n)  # measured service_s, 0.0 when not measured
        self.prefill: Floats = np.zeros(n)  # measured prefill tokens/s, 0.0 when not measured
        self.wait: Floats = np.zeros(n)  # policy.queue_wait_s at its own rate, else the default
        # for a wait at the peers' mean service_s, (busy - max_in_flight + 1) * mean / parallel:
        self.units: Floats = np.zeros(n)  # busy - max_in_flight + 1, as a float
        self.parallel: Floats = np.ones(n)  # max_in_flight, as a float
        self.at_peers: Bools = np.zeros(n, np.bool_)  # queued (busy >= max_in_flight), not measured
        self.rate: Floats = np.ones(n)  # its own prefill rate, else the default (never 0)
        # per tier: rows, never heard from, load unknown, measured service_s, measured prefill
        self.counts = [[0] * 5, [0] * 5]
        self.stale = False  # an id without a row was indexed: rebuild before the next read
        self.serving: object = None  # the records the rows were last checked against ...
        self.order: npt.NDArray[np.intp] = np.zeros(0, np.intp)  # ... their rows, in their order
        for worker_id, slot in slots.items():
            self.set(worker_id, slot)

    def set(self, worker_id: str, slot: Slot) -> None:
        """The replica is indexed at this slot (it was not: ModelIndex removes first)."""
        p = self.pos.get(worker_id)
        if p is None:
            self.stale = True
            return
        profile, busy = slot.profile, slot.busy
        self._count(slot, 1)
        self.tier[p] = slot.tier
        self.busy[p] = busy
        self.mif[p] = profile.max_in_flight
        self.heard[p] = profile.heard
        self.known[p] = profile.known
        self.free[p] = _free(profile, busy)
        self.service[p] = profile.service_s or 0.0
        self.prefill[p] = profile.prefill_tokens_per_s or 0.0
        self.wait[p] = _wait(profile, busy, self.defaults)
        self.units[p] = busy - profile.max_in_flight + 1
        self.parallel[p] = profile.max_in_flight
        self.at_peers[p] = busy >= profile.max_in_flight and not profile.service_s
        self.rate[p] = profile.prefill_tokens_per_s or self.defaults.prefill_tokens_per_s

    def clear(self, worker_id: str, slot: Slot) -> None:
        """The replica left the index (it was at this slot)."""
        p = self.pos.get(worker_id)
        if p is not None and self.tier[p] != ABSENT:
            self._count(slot, -1)
            self.tier[p] = ABSENT

    def _count(self, slot: Slot, step: int) -> None:
        counts, profile = self.counts[slot.tier], slot.profile
        counts[LIVE] += step
        counts[UNHEARD] += step * (not profile.heard)
        counts[UNKNOWN] += step * (not profile.known)
        counts[TIMED] += step * bool(profile.service_s)
        counts[RATED] += step * bool(profile.prefill_tokens_per_s)


def _free(profile: Profile, busy: int) -> int:
    """Places left, so that Profile.room(busy, slots) is `need <= free`."""
    if not profile.heard:
        return ALWAYS
    if not profile.known:
        return NEVER
    return profile.max_in_flight + profile.max_queue_depth - busy


def _wait(profile: Profile, busy: int, defaults: Defaults) -> float:
    """policy.queue_wait_s, the same operations in the same order (bit for bit)."""
    mif = profile.max_in_flight
    excess = busy - mif
    if excess < 0:
        return 0.0
    if mif == 0:  # not on the wire (max_in_flight >= 1); the scan would divide by zero
        return math.inf
    service = profile.service_s if profile.service_s else defaults.service_s
    return (excess + 1) * service / mif
