"""The worker's prefix cache: an LRU of chained blocks, its netted changes, its events (tables)."""

from __future__ import annotations

import pytest

from schemas.kv import KvBlocks
from services.worker.prefix_cache import Blocks, Changes, PrefixCache, kv_event


def filled(capacity: int, *prompts: Blocks) -> PrefixCache:
    cache = PrefixCache(capacity)
    for blocks in prompts:
        cache.insert(blocks)
    return cache


LOOKUPS: list[tuple[str, tuple[Blocks, ...], Blocks, int]] = [
    # (case, prompts inserted, prompt looked up, leading blocks held)
    ("empty cache", (), (1, 2, 3), 0),
    ("nothing to look up", ((1, 2),), (), 0),
    ("the whole prompt", ((1, 2, 3),), (1, 2, 3), 3),
    ("a longer prompt shares the head", ((1, 2),), (1, 2, 7, 8), 2),
    ("a shorter prompt", ((1, 2, 3),), (1, 2), 2),
    ("hits stop at the first miss", ((1, 3),), (1, 2, 3), 1),
    ("a held tail without its head is no hit", ((2, 3),), (1, 2, 3), 0),
    ("two prompts: the one sharing counts", ((1, 2), (5, 6)), (5, 6, 7), 2),
]


@pytest.mark.parametrize(
    ("prompts", "lookup", "hits"), [c[1:] for c in LOOKUPS], ids=[c[0] for c in LOOKUPS]
)
def test_lookup_counts_leading_blocks(
    prompts: tuple[Blocks, ...], lookup: Blocks, hits: int
) -> None:
    cache = filled(8, *prompts)
    before = cache.snapshot()
    assert cache.lookup(lookup) == hits
    assert cache.snapshot() == before  # a lookup changes nothing


INSERTS: list[tuple[str, int, tuple[Blocks, ...], Blocks, tuple[Blocks, Blocks], Blocks]] = [
    # (case, capacity, inserted before, inserted now, (stored, evicted), held after, LRU first)
    ("into an empty cache", 4, (), (1, 2, 3), ((1, 2, 3), ()), (3, 2, 1)),
    ("held blocks are refreshed, not stored", 4, ((1, 2),), (1, 2, 3), ((3,), ()), (3, 2, 1)),
    ("the same prompt again changes nothing", 4, ((1, 2),), (1, 2), ((), ()), (2, 1)),
    ("full: an old tail goes first", 4, ((1, 2, 3),), (7, 8), ((7, 8), (3,)), (2, 1, 8, 7)),
    ("full: then its head", 3, ((1, 2, 3),), (7, 8), ((7, 8), (3, 2)), (1, 8, 7)),
    ("refreshed outlives older", 4, ((1, 2), (5, 6), (1, 2)), (9,), ((9,), (6,)), (5, 2, 1, 9)),
    ("too long: its head is kept", 3, (), (1, 2, 3, 4, 5), ((1, 2, 3), ()), (3, 2, 1)),
    ("and evicts everything else", 2, ((7, 8),), (1, 2, 3), ((1, 2), (8, 7)), (2, 1)),
]


@pytest.mark.parametrize(
    ("capacity", "before", "now", "change", "held"),
    [c[1:] for c in INSERTS],
    ids=[c[0] for c in INSERTS],
)
def test_insert_stores_in_order_and_evicts_least_recent(
    capacity: int,
    before: tuple[Blocks, ...],
    now: Blocks,
    change: tuple[Blocks, Blocks],
    held: Blocks,
) -> None:
    cache = filled(capacity, *before)
    assert cache.insert(now) == change
    assert cache.snapshot() == held
    assert len(cache) <= capacity


def test_listeners_hear_every_change_and_only_changes() -> None:
    cache = PrefixCache(2)
    heard: list[tuple[Blocks, Blocks]] = []
    cache.watch(lambda stored, evicted: heard.append((stored, evicted)))
    cache.insert((1, 2))
    cache.insert((1, 2))  # refreshed only
    cache.insert((3,))
    assert heard == [((1, 2), ()), ((3,), (2,))]


def test_a_cache_holds_at_least_one_block() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        PrefixCache(0)


CHANGES: list[tuple[str, list[tuple[Blocks, Blocks]], tuple[Blocks, Blocks]]] = [
    # (case, (stored, evicted) of each insert since the last publish, what the next event says)
    ("nothing", [], ((), ())),
    ("one insert", [((1, 2), (9,))], ((1, 2), (9,))),
    ("inserts add up, in order", [((1,), ()), ((2,), (8,)), ((3,), (9,))], ((1, 2, 3), (8, 9))),
    ("stored then evicted: never published", [((1, 2), ()), ((3,), (1,))], ((2, 3), ())),
    ("evicted then stored again: no change", [((), (5,)), ((5,), ())], ((), ())),
    ("evicted, back, evicted again", [((), (5,)), ((5,), ()), ((), (5,))], ((), (5,))),
]


@pytest.mark.parametrize(
    ("inserts", "event"), [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES]
)
def test_changes_net_out_between_publishes(
    inserts: list[tuple[Blocks, Blocks]], event: tuple[Blocks, Blocks]
) -> None:
    changes = Changes()
    for stored, evicted in inserts:
        changes.add(stored, evicted)
    assert len(changes) == len(event[0]) + len(event[1])
    assert changes.take() == event
    assert changes.take() == ((), ())  # taken: the next batch starts empty


def test_applying_netted_changes_to_the_published_state_gives_the_cache() -> None:
    """What a router does with the events: (published - evicted) | stored == the cache."""
    cache, changes = PrefixCache(5), Changes()
    cache.watch(changes.add)
    published: set[int] = set()
    prompts = [(1, 2, 3), (1, 2, 4), (7, 8), (1, 2, 3), (9, 10, 11), (7, 8), (12,)]
    for i, blocks in enumerate(prompts):
        cache.insert(blocks)
        if i % 3 == 2:  # publish every third insert
            stored, evicted = changes.take()
            published = (published - set(evicted)) | set(stored)
            assert published == set(cache.snapshot())
    stored, evicted = changes.take()
    assert (published - set(evicted)) | set(stored) == set(cache.snapshot())


def test_kv_event_is_a_snapshot_when_asked_or_when_changes_outgrow_the_cache() -> None:
    cache, changes = PrefixCache(4), Changes()
    cache.watch(changes.add)
    assert kv_event("w", "m", cache, changes, full=False) is None  # nothing to say
    assert kv_event("w", "m", cache, changes, full=True) == KvBlocks(
        worker_id="w", model="m", full=True
    )  # an empty cache is still said, in full
    cache.insert((1, 2))
    assert kv_event("w", "m", cache, changes, full=False) == KvBlocks(
        worker_id="w", model="m", stored=(1, 2)
    )
    cache.insert((3, 4, 5))  # stored 3, 4, 5 and evicted 2: four changes, not more than the cache
    assert kv_event("w", "m", cache, changes, full=False) == KvBlocks(
        worker_id="w", model="m", stored=(3, 4, 5), evicted=(2,)
    )
    cache.insert((6, 7, 8))
    cache.insert((9,))  # 4 stored + 4 evicted > 4 held: the cache itself is the smaller message
    snapshot = kv_event("w", "m", cache, changes, full=False)
    assert snapshot == KvBlocks(worker_id="w", model="m", stored=cache.snapshot(), full=True)
    assert len(changes) == 0  # the snapshot said it all
    cache.insert((1,))
    assert kv_event("w", "m", cache, changes, full=True) == KvBlocks(
        worker_id="w", model="m", stored=cache.snapshot(), full=True
    )
    assert kv_event("w", "m", cache, changes, full=False) is None
