"""Replica choice over a model's columns (table.py) with numpy, equal to the scan. Pure, no I/O.

Where indexed.py cannot be exact in little (a tier of more than MAX_PROFILES profiles: replicas
reporting their own measured rates, the common case; or a mix of measured and unmeasured ones,
whose rates are then their peers' mean), this is the scan (scan.py) as array operations over the
model's rows: the same float64 operations in the same order as policy.py, so each estimate is the
scan's bit for bit; the peers' mean is Python's own sum over the measured candidates, in the
records' order, as policy.with_peers adds them; the replicas holding the prompt's first block are
costed one by one by policy.estimate_s; the tie rule picks the n-th of the tied set by id, rows
being sorted by id. Cost: O(replicas of the model) in a few array passes, no Python per replica.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import msgspec
import numpy as np

from schemas.registry import WorkerRecord
from services.router.index import ModelIndex
from services.router.indexed import Ask, candidate
from services.router.policy import Defaults, Draw, PolicyName, estimate_s
from services.router.table import LIVE, RATED, TIMED, UNHEARD, UNKNOWN, Bools, Floats, Table

Late = Literal["late"]
LATE: Late = "late"  # usable replicas, none within the budget
Picked = tuple[str, int, float | None]  # worker, its busy, its estimate under cost
# Python's sum adds floats one after another up to 3.11, with a compensation from 3.12 on (this
# tells them apart: 1.0 is lost to rounding only without one)
SEQUENTIAL_SUM = sum([1e16, 1.0, -1e16]) == 0.0
Serving = dict[str, WorkerRecord]  # the model's records, in the records' order (Roster.serving)


class Pool(NamedTuple):
    mask: Bools  # the candidates' rows
    tier: int
    unheard: bool  # some candidate was never heard from: spread, do not compare costs
    whole: bool  # every row is a candidate (the mask is all True)


def table_of(ix: ModelIndex, serving: Serving, defaults: Defaults) -> Table:
    """The model's columns, (re)built from its index when the rows are not its records' workers
    (checked when the records change), with the rows in the records' order."""
    table = ix.table
    if (
        table is None
        or table.stale
        or (table.serving is not serving and rows_differ(table, serving))
    ):
        table = ix.table = Table(serving.keys() | ix.slots.keys(), ix.slots, defaults)
    if table.serving is not serving:
        rows = (table.pos[w] for w in serving if w in table.pos)
        table.order, table.serving = np.fromiter(rows, np.intp), serving
    return table


def rows_differ(table: Table, serving: Serving) -> bool:
    """Do the records name other workers than the rows do?"""
    return len(serving) != len(table.pos) or any(w not in table.pos for w in serving)


def choose(
    ix: ModelIndex, serving: Serving, ask: Ask, policy: PolicyName, defaults: Defaults, draw: Draw
) -> Picked | Late | None:
    """(worker, its busy, its estimate under cost), LATE, or None when no replica is usable."""
    table = table_of(ix, serving, defaults)
    found = pool(table, ask)
    if found is None:
        return None
    mask, whole = found.mask, found.whole
    peers, est = estimates(table, ix, ask, mask, found.tier)
    if ask.budget_s is not None:
        known = np.where(table.known, est, 0.0) if table.counts[found.tier][UNKNOWN] else est
        mask, whole = mask & (known <= ask.budget_s), False
        if not mask.any():
            return LATE
        if policy == "cost" and not found.unheard and mixed(table, found.tier):
            peers, est = estimates(table, ix, ask, mask, found.tier)  # those in time
    if policy == "least_busy" or found.unheard:
        row = least_busy(table, mask, None if policy == "least_busy" else draw)
        return table.ids[row], int(table.busy[row]), None
    best = float((est if whole else est[mask]).min())
    bound = max(best * (1 + peers.tie_ratio), best + peers.tie_s)
    row = least_busy(table, mask & (est <= bound), draw)
    return table.ids[row], int(table.busy[row]), float(est[row])


def best_estimate(ix: ModelIndex, serving: Serving, ask: Ask, defaults: Defaults) -> float | None:
    """The least estimated TTFT (unknown load: 0) in the pool; None when none is usable."""
    table = table_of(ix, serving, defaults)
    found = pool(table, ask)
    if found is None:
        return None
    _, est = estimates(table, ix, ask, found.mask, found.tier)
    known = np.where(table.known, est, 0.0) if table.counts[found.tier][UNKNOWN] else est
    return float(known[found.mask].min())


def pool(table: Table, ask: Ask) -> Pool | None:
    """The first tier with a usable replica (not left out; with room when asked), or None."""
    for tier in (0, 1):
        if not table.counts[tier][LIVE]:
            continue
        mask = table.tier == tier
        for worker_id in ask.exclude:
            row = table.pos.get(worker_id)
            if row is not None:
                mask[row] = False
        if ask.need_room:
            need = 1 if ask.slots == 1 else np.where(ask.slots <= table.mif, ask.slots, 1)
            mask &= table.free >= need
        picky = bool(ask.exclude) or ask.need_room
        if picky and not mask.any():
            continue
        unheard = tier == 0 and table.counts[0][UNHEARD] > 0 and bool((mask & ~table.heard).any())
        whole = not picky and table.counts[tier][LIVE] == len(table.ids)
        return Pool(mask, tier, unheard, whole)
    return None


def mixed(table: Table, tier: int) -> bool:
    """Does the tier hold both measured and unmeasured rates (so peers' means matter)?"""
    counts = table.counts[tier]
    return 0 < counts[TIMED] < counts[LIVE] or 0 < counts[RATED] < counts[LIVE]


def estimates(
    table: Table, ix: ModelIndex, ask: Ask, mask: Bools, tier: int
) -> tuple[Defaults, Floats]:
    """policy.with_peers over the candidates in `mask`, and every row's estimate_s under it."""
    peers, wait, rate = table.defaults, table.wait, table.rate
    counts = table.counts[tier]
    if 0 < counts[TIMED] < counts[LIVE]:
        mean = peers_mean(table, table.service, mask)
        if mean is not None:
            peers = msgspec.structs.replace(peers, service_s=mean)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # rows not asked
                wait = np.where(table.at_peers, table.units * mean / table.parallel, wait)
    if 0 < counts[RATED] < counts[LIVE]:
        mean = peers_mean(table, table.prefill, mask)
        if mean is not None:
            peers = msgspec.structs.replace(peers, prefill_tokens_per_s=mean)
            rate = np.where(table.prefill != 0, table.prefill, mean)
    # (a rate is never 0: its own when truthy, else a mean of truthy ones or the default)
    est: Floats = wait + max(ask.prompt.tokens, 0) / rate
    for worker_id, cached in ask.hits.items():  # the few holding the prompt's first block
        row = table.pos[worker_id]
        if mask[row]:
            slot = ix.slots[worker_id]
            c = candidate(slot.profile, slot.busy, cached, worker_id)
            est[row] = estimate_s(c, ask.prompt, peers)
    return peers, est


def peers_mean(table: Table, column: Floats, mask: Bools) -> float | None:
    """The mean of the candidates' measured values, summed as with_peers does (in the records'
    order, as Python's sum adds floats, so the same float); None when none measured it."""
    values = column.take(table.order)
    measured = values[mask.take(table.order) & (values != 0)]
    if not len(measured):
        return None
    if SEQUENTIAL_SUM:  # one addition after another: what accumulate does too (never pairwise)
        return float(np.add.accumulate(measured)[-1]) / len(measured)
    return float(sum(measured.tolist())) / len(measured)


def least_busy(table: Table, mask: Bools, draw: Draw | None) -> int:
    """policy.least_busy over the rows in `mask`: the least busy, ties to the smallest id, or
    the draw's pick among them by id."""
    fewest = table.busy[mask].min()
    tied = np.flatnonzero(mask & (table.busy == fewest))
    if draw is None:
        return int(tied[0])
    return int(tied[min(int(draw() * len(tied)), len(tied) - 1)])
