"""Property test: random operation sequences against the registry core keep every invariant."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.registry import (
    CommandError,
    RegistryEvent,
    WorkerRegistered,
    WorkerRemoved,
    WorkerReplaced,
    WorkerSpec,
    WorkerStatus,
    WorkerStatusChanged,
)
from services.common.seq import Sequencer, SequenceTracker
from services.registry.core import RegistryBook
from services.registry.effects import Effect

URLS = [f"http://h{i}:8000" for i in range(4)]
MODELS = ["a", "b", "c"]
IDS = [f"w{i}" for i in range(6)]

specs = st.builds(
    lambda url, models: WorkerSpec(url=url, models=tuple(models)),
    st.sampled_from(URLS),
    st.lists(st.sampled_from(MODELS), max_size=3),
)
ops = st.one_of(
    st.tuples(st.just("register"), specs, st.sampled_from(IDS)),
    st.tuples(st.just("upsert"), specs, st.sampled_from(IDS)),
    st.tuples(st.just("replace"), st.sampled_from(IDS), specs),
    st.tuples(st.just("set_status"), st.sampled_from(IDS), st.sampled_from(list(WorkerStatus))),
    st.tuples(st.just("remove"), st.sampled_from(IDS)),
    st.tuples(st.just("heartbeat"), st.sampled_from(IDS), st.sampled_from(list(WorkerStatus))),
    st.tuples(st.just("expire"), st.floats(min_value=0, max_value=10)),
)


def plan(book: RegistryBook, op: tuple[Any, ...], now: float) -> Effect:
    match op:
        case ("register", spec, new_id):
            return book.register(spec, new_id, now)
        case ("upsert", spec, new_id):
            return book.upsert(spec, new_id, now)
        case ("replace", worker_id, spec):
            return book.replace(worker_id, spec, now)
        case ("set_status", worker_id, status):
            return book.set_status(worker_id, status)
        case ("remove", worker_id):
            return book.remove(worker_id)
        case ("heartbeat", worker_id, status):
            return book.heartbeat(worker_id, status, now)
        case ("expire_one", worker_id, ttl):
            return book.expire_one(worker_id, now, ttl)
    raise AssertionError(op)


def snapshot(book: RegistryBook) -> tuple[Any, ...]:
    models = {m: set(ids) for m, ids in book.model_index.items()}
    return dict(book.records), dict(book.url_index), models, dict(book.last_heartbeat)


def apply(book: RegistryBook, op: tuple[Any, ...], now: float) -> list[RegistryEvent]:
    """Plan (which must change nothing), then commit, as the shell does after its KV writes."""
    if op[0] == "expire":
        events: list[RegistryEvent] = []
        for worker_id in book.expired(now, op[1]):
            events += apply(book, ("expire_one", worker_id, op[1]), now)
        return events
    before = snapshot(book)
    effect = plan(book, op, now)
    assert snapshot(book) == before
    return list(book.commit(effect).events)


def check_invariants(book: RegistryBook) -> None:
    # 1. URL uniqueness: the index is exactly url -> id of the records.
    assert book.url_index == {r.url: r.id for r in book.records.values()}
    # 2. Model index equals the records' models exactly, no empty sets.
    expected: dict[str, set[str]] = {}
    for record in book.records.values():
        for model in record.models:
            expected.setdefault(model, set()).add(record.id)
    assert book.model_index == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=40))
def test_random_operations_keep_invariants(sequence: list[tuple[Any, ...]]) -> None:
    book = RegistryBook()
    sequencer = Sequencer("registry", epoch=1)
    tracker = SequenceTracker()
    revisions: dict[str, int] = {}
    for step, op in enumerate(sequence):
        events = apply(book, op, now=float(step))
        check_invariants(book)
        for event in events:
            env = sequencer.stamp(event, now=float(step))
            # Seqs are contiguous from 1: every stamped event is in order for a fresh follower.
            assert tracker.observe("registry", env.epoch, env.seq).__class__.__name__ == "InOrder"
            # 3. Revisions strictly increase per record (and restart at 1 after a remove).
            match event:
                case WorkerRegistered(worker=rec):
                    assert rec.revision == 1
                    revisions[rec.id] = 1
                case WorkerReplaced(old=old, new=new):
                    assert new.revision == old.revision + 1 == revisions[new.id] + 1
                    revisions[new.id] = new.revision
                case WorkerStatusChanged(worker_id=wid, revision=rev, old_status=a, new_status=b):
                    assert a != b
                    assert rev == revisions[wid] + 1
                    revisions[wid] = rev
                case WorkerRemoved(worker=rec):
                    revisions.pop(rec.id)
        # Events describe the book: a follower applying them holds exactly the records.
        assert set(revisions) == set(book.records)
        for worker_id, rev in revisions.items():
            assert book.records[worker_id].revision == rev


@given(st.lists(ops, max_size=30))
def test_errors_change_nothing(sequence: list[tuple[Any, ...]]) -> None:
    book = RegistryBook()
    for step, op in enumerate(sequence):
        if op[0] == "expire":
            continue
        before = snapshot(book)
        out = book.commit(plan(book, op, float(step)))
        if isinstance(out.reply, CommandError):
            assert snapshot(book) == before
            assert out.events == ()
            assert out.writes == ()
