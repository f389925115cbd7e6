"""What the router knows of each worker's prefix cache, from its KvBlocks stream. Pure, no I/O.

Per worker and model, an insertion-ordered set of block hashes (schemas/prefix.py), at most
`cap` of them (the oldest go first). A model's blocks become known only through a full snapshot
(`full=True`); deltas then apply in order (evicted first, then stored). A gap in the worker's
seq or a new epoch means an event was lost: everything known of that worker is dropped (unknown
counts as empty: no affinity, never a stale promise) until the next full snapshot of each model,
which workers send at start and every few seconds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from enum import Enum

from schemas.kv import KvBlocks
from services.common.seq import Duplicate, InOrder, SequenceTracker

DEFAULT_CAP = 65_536  # blocks per worker and model: 4M tokens, more than most GPUs cache
EMPTY: OrderedDict[int, None] = OrderedDict()


class Applied(Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # seen already: ignored
    UNKNOWN = "unknown"  # a delta for a model not (re)synced by a full snapshot yet: ignored
    RESYNC = "resync"  # a gap or a new epoch: the worker's caches were dropped


class PrefixCaches:
    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        self.cap = cap
        self.blocks: dict[str, dict[str, OrderedDict[int, None]]] = {}
        self.tracker = SequenceTracker()

    def held(self, worker_id: str, model: str) -> OrderedDict[int, None]:
        """The blocks the worker holds for the model, as far as we know (membership: `in`)."""
        return self.blocks.get(worker_id, {}).get(model, EMPTY)

    def forget(self, worker_id: str) -> None:
        self.blocks.pop(worker_id, None)
        self.tracker.forget(worker_id)

    def workers(self) -> list[str]:
        return list(self.blocks)

    def apply(self, epoch: int, seq: int, event: KvBlocks) -> Applied:
        worker = event.worker_id
        verdict = self.tracker.observe(worker, epoch, seq)
        if isinstance(verdict, Duplicate):
            return Applied.DUPLICATE
        resync = not isinstance(verdict, InOrder)
        if resync:
            self.blocks.pop(worker, None)
            self.tracker.reset(worker, epoch, seq)  # later events of this epoch apply in order
        models = self.blocks.setdefault(worker, {})
        if event.full:
            models[event.model] = self._bounded(OrderedDict.fromkeys(event.stored))
        elif event.model in models:
            self._delta(models[event.model], event.evicted, event.stored)
        elif not resync:
            return Applied.UNKNOWN
        return Applied.RESYNC if resync else Applied.APPLIED

    def _delta(
        self, held: OrderedDict[int, None], evicted: Iterable[int], stored: Iterable[int]
    ) -> None:
        for block in evicted:
            held.pop(block, None)
        for block in stored:
            held[block] = None
            held.move_to_end(block)  # stored again: the newest
        self._bounded(held)

    def _bounded(self, held: OrderedDict[int, None]) -> OrderedDict[int, None]:
        while len(held) > self.cap:
            held.popitem(last=False)
        return held
