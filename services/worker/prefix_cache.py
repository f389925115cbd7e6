"""A prefix cache's bookkeeping: an LRU of prompt blocks, its changes, their events. Pure, no I/O.

Blocks are schemas/prefix.py's chained hashes, so a cache holding block i of a prompt can reuse
its KV only if it also holds blocks 0..i-1: a lookup counts leading blocks and stops at the first
miss. One insert touches a prompt's blocks last to first, so its first block is the most recently
used and a full cache evicts the tails of old prompts before their heads (what a radix cache's
leaf-first eviction does), never a head whose tail would then be unreachable.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from schemas.kv import MAX_BLOCKS_PER_EVENT, KvBlocks

Blocks = tuple[int, ...]
Listener = Callable[[Blocks, Blocks], None]  # (stored, evicted) of one insert


class PrefixCache:
    """A bounded LRU of block hashes (capacity in blocks, at least 1); deterministic."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a prefix cache holds at least one block, not {capacity}")
        self.capacity = capacity
        self._held: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._listeners: list[Listener] = []

    def __len__(self) -> int:
        return len(self._held)

    def watch(self, listener: Listener) -> None:
        """Call listener(stored, evicted) after every insert that changed what is held."""
        self._listeners.append(listener)

    def lookup(self, blocks: Sequence[int]) -> int:
        """How many leading blocks are held (changes nothing: insert() refreshes them)."""
        count = 0
        for block in blocks:
            if block not in self._held:
                break
            count += 1
        return count

    def insert(self, blocks: Sequence[int]) -> tuple[Blocks, Blocks]:
        """Hold a prefilled prompt's blocks (its first `capacity`); returns (stored, evicted):
        the blocks newly held, in prompt order, and those dropped for them, oldest first."""
        kept = blocks[: self.capacity]
        stored: list[int] = []
        for block in reversed(kept):
            if block in self._held:
                self._held.move_to_end(block)
            else:
                self._held[block] = None
                stored.append(block)
        evicted: list[int] = []
        while len(self._held) > self.capacity:  # only older blocks: this prompt's are newest
            evicted.append(self._held.popitem(last=False)[0])
        stored.reverse()
        change = (tuple(stored), tuple(evicted))
        if stored or evicted:
            for listener in self._listeners:
                listener(*change)
        return change

    def snapshot(self) -> Blocks:
        """Every held block, least recently used first."""
        return tuple(self._held)


class Changes:
    """What a cache gained and lost since its state was last published, netted: a block stored
    and evicted in between is neither, one evicted and stored again is neither."""

    def __init__(self) -> None:
        self._stored: dict[int, None] = {}  # not in the published state, held now
        self._evicted: dict[int, None] = {}  # in the published state, gone now

    def __len__(self) -> int:
        return len(self._stored) + len(self._evicted)

    def add(self, stored: Sequence[int], evicted: Sequence[int]) -> None:
        """One insert's change (evicted applies first, as on the wire)."""
        for block in evicted:
            if block in self._stored:  # stored since the last publish: never published
                del self._stored[block]
            else:
                self._evicted[block] = None
        for block in stored:
            if block in self._evicted:  # published, evicted, back again: no change
                del self._evicted[block]
            else:
                self._stored[block] = None

    def take(self) -> tuple[Blocks, Blocks]:
        """(stored, evicted) since the last take or clear, and start again from now."""
        change = (tuple(self._stored), tuple(self._evicted))
        self.clear()
        return change

    def clear(self) -> None:
        """The current state was published whole (a snapshot): nothing is pending."""
        self._stored.clear()
        self._evicted.clear()


def kv_event(
    worker_id: str, model: str, cache: PrefixCache, changes: Changes, full: bool
) -> KvBlocks | None:
    """The next message about one model's cache: everything it holds when `full` or when the
    changes outgrow the cache itself (the snapshot is then the smaller message, and never over
    MAX_BLOCKS_PER_EVENT); else the changes since the last, None when there are none."""
    if full or len(changes) > min(cache.capacity, MAX_BLOCKS_PER_EVENT):
        changes.clear()
        return KvBlocks(worker_id=worker_id, model=model, stored=cache.snapshot(), full=True)
    if not len(changes):
        return None
    stored, evicted = changes.take()
    return KvBlocks(worker_id=worker_id, model=model, stored=stored, evicted=evicted)
