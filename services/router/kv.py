"""What the router knows of each worker's prefix cache, from its KvBlocks stream. Pure, no I/O.

Per worker and model, an insertion-ordered set of block hashes (schemas/prefix.py), at most
`cap` of them (the oldest go first). A model's blocks become known only through a full snapshot
(`full=True`); deltas then apply in order (evicted first, then stored). A gap in the worker's
seq or a new epoch means an event was lost: everything known of that worker is dropped (unknown
counts as empty: no affinity, never a stale promise) until the next full snapshot of each model,
which workers send at start and every few seconds.

Per model, a reverse index block -> the workers holding it (`holding`), so a choice finds the
replicas that hold a prompt's first block (the only ones with cached blocks for it) without
looking at every replica. A full snapshot updates it by its difference from what was held (set
operations on the keys), so a snapshot that changes nothing costs no per-block work in Python.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from enum import Enum

from schemas.kv import KvBlocks
from services.common.seq import Duplicate, InOrder, SequenceTracker

DEFAULT_CAP = 65_536  # blocks per worker and model: 4M tokens, more than most GPUs cache
EMPTY: OrderedDict[int, None] = OrderedDict()
NOBODY: frozenset[str] = frozenset()


class Applied(Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # seen already: ignored
    UNKNOWN = "unknown"  # a delta for a model not (re)synced by a full snapshot yet: ignored
    RESYNC = "resync"  # a gap or a new epoch: the worker's caches were dropped


class PrefixCaches:
    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        self.cap = cap
        self.blocks: dict[str, dict[str, OrderedDict[int, None]]] = {}
        self.holders: dict[str, dict[int, set[str]]] = {}  # model -> block -> workers
        self.tracker = SequenceTracker()

    def held(self, worker_id: str, model: str) -> OrderedDict[int, None]:
        """The blocks the worker holds for the model, as far as we know (membership: `in`)."""
        return self.blocks.get(worker_id, {}).get(model, EMPTY)

    def holding(self, model: str, block: int) -> set[str] | frozenset[str]:
        """The workers known to hold this block of the model."""
        return self.holders.get(model, {}).get(block, NOBODY)

    def forget(self, worker_id: str) -> None:
        self._drop(worker_id)
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
            self._drop(worker)
            self.tracker.reset(worker, epoch, seq)  # later events of this epoch apply in order
        models = self.blocks.setdefault(worker, {})
        if event.full:
            new = self._bounded(OrderedDict.fromkeys(event.stored))
            old = models.get(event.model, EMPTY)
            index = self.holders.setdefault(event.model, {})
            for block in old.keys() - new.keys():
                _unhold(index, block, worker)
            for block in new.keys() - old.keys():
                index.setdefault(block, set()).add(worker)
            models[event.model] = new
        elif event.model in models:
            self._delta(worker, event.model, event.evicted, event.stored)
        elif not resync:
            return Applied.UNKNOWN
        return Applied.RESYNC if resync else Applied.APPLIED

    def _delta(
        self, worker: str, model: str, evicted: Iterable[int], stored: Iterable[int]
    ) -> None:
        held, index = self.blocks[worker][model], self.holders.setdefault(model, {})
        for block in evicted:
            if block in held:
                del held[block]
                _unhold(index, block, worker)
        for block in stored:
            if block not in held:
                index.setdefault(block, set()).add(worker)
            held[block] = None
            held.move_to_end(block)  # stored again: the newest
        dropped: list[int] = []
        self._bounded(held, dropped)
        for block in dropped:
            _unhold(index, block, worker)

    def _drop(self, worker: str) -> None:
        for model, held in self.blocks.pop(worker, {}).items():
            index = self.holders.get(model, {})
            for block in held:
                _unhold(index, block, worker)

    def _bounded(
        self, held: OrderedDict[int, None], dropped: list[int] | None = None
    ) -> OrderedDict[int, None]:
        while len(held) > self.cap:
            block, _ = held.popitem(last=False)
            if dropped is not None:
                dropped.append(block)
        return held


def _unhold(index: dict[int, set[str]], block: int, worker: str) -> None:
    workers = index.get(block)
    if workers is not None:
        workers.discard(worker)
        if not workers:
            del index[block]
