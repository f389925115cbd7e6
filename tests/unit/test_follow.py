"""RegistryMirror: in-order apply, duplicates, gaps, new epochs, beacons, buffering and replay."""

from __future__ import annotations

from schemas.base import Envelope
from schemas.registry import (
    RegistryBeacon,
    RegistryEvent,
    RegistrySnapshot,
    WorkerRecord,
    WorkerRegistered,
    WorkerRemoved,
    WorkerStatus,
    WorkerStatusChanged,
)
from services.registry.mirror import Applied, Ignored, RegistryMirror, Resync

S = WorkerStatus


def rec(worker_id: str, status: WorkerStatus = S.PENDING, revision: int = 1) -> WorkerRecord:
    return WorkerRecord(
        id=worker_id, url=f"http://{worker_id}:1", models=("m",), status=status, revision=revision
    )


def env(seq: int, body: RegistryEvent, epoch: int = 1) -> Envelope[RegistryEvent]:
    return Envelope(source="registry", epoch=epoch, seq=seq, sent_at=0.0, body=body)


def ready(worker_id: str, revision: int = 2) -> WorkerStatusChanged:
    return WorkerStatusChanged(
        worker_id=worker_id,
        old_status=S.PENDING,
        new_status=S.READY,
        revision=revision,
        worker=rec(worker_id, S.READY, revision),
    )


def synced(seq: int = 0, *records: WorkerRecord) -> RegistryMirror:
    m = RegistryMirror()
    assert m.apply_snapshot(RegistrySnapshot(epoch=1, seq=seq, workers=records)) == Applied()
    return m


def test_starts_needing_a_snapshot_and_buffers_until_then() -> None:
    m = RegistryMirror()
    assert m.syncing
    assert m.observe(env(1, WorkerRegistered(worker=rec("a")))) == Ignored()
    assert m.observe(env(2, WorkerRegistered(worker=rec("b")))) == Ignored()
    # the snapshot already includes seq 1; seq 2 is replayed from the buffer
    m.apply_snapshot(RegistrySnapshot(epoch=1, seq=1, workers=(rec("a"),)))
    assert set(m.records) == {"a", "b"}
    assert m.position == (1, 2)


def test_in_order_events_apply() -> None:
    m = synced()
    assert m.observe(env(1, WorkerRegistered(worker=rec("a")))) == Applied()
    assert m.observe(env(2, ready("a"))) == Applied()
    assert m.records["a"].status == S.READY
    assert m.observe(env(3, WorkerRemoved(worker=rec("a", S.READY, 2)))) == Applied()
    assert m.records == {}


def test_status_change_without_full_record_still_applies() -> None:
    m = synced(0, rec("a"))
    body = WorkerStatusChanged(worker_id="a", old_status=S.PENDING, new_status=S.READY, revision=2)
    assert m.observe(env(1, body)) == Applied()
    assert (m.records["a"].status, m.records["a"].revision) == (S.READY, 2)


def test_duplicate_is_ignored() -> None:
    m = synced(3, rec("a"))
    assert m.observe(env(3, WorkerRemoved(worker=rec("a")))) == Ignored()
    assert "a" in m.records


def test_gap_resyncs_then_replays_newer_buffered_events() -> None:
    m = synced(1, rec("a"))
    assert m.observe(env(3, WorkerRegistered(worker=rec("c")))) == Resync("gap")
    assert m.gaps == 1
    assert m.observe(env(4, WorkerRegistered(worker=rec("d")))) == Ignored()  # buffered
    snap = RegistrySnapshot(epoch=1, seq=3, workers=(rec("a"), rec("b"), rec("c")))
    assert m.apply_snapshot(snap) == Applied()
    assert set(m.records) == {"a", "b", "c", "d"}
    assert m.position == (1, 4)


def test_new_epoch_resyncs_and_stale_snapshot_events_are_dropped() -> None:
    m = synced(5, rec("a"))
    assert m.observe(env(1, WorkerRegistered(worker=rec("z")), epoch=2)) == Resync("new_epoch")
    m.apply_snapshot(RegistrySnapshot(epoch=2, seq=1, workers=(rec("z"),)))
    assert set(m.records) == {"z"}
    assert m.position == (2, 1)


def test_beacon_ahead_means_the_last_event_was_lost() -> None:
    m = synced(2, rec("a"))
    assert m.observe(env(2, RegistryBeacon(last_seq=2))) == Ignored()
    assert m.observe(env(3, RegistryBeacon(last_seq=3))) == Resync("beacon")
    assert m.buffer == []  # beacons are never buffered


def test_replay_stops_at_a_gap_and_drops_what_does_not_follow() -> None:
    m = synced(1)
    m.observe(env(3, WorkerRegistered(worker=rec("c"))))
    m.observe(env(4, WorkerRegistered(worker=rec("d"))))
    m.observe(env(9, WorkerRegistered(worker=rec("ghost"))))
    step = m.apply_snapshot(RegistrySnapshot(epoch=1, seq=3, workers=(rec("c"),)))
    assert step == Applied()
    assert not m.syncing
    assert set(m.records) == {"c", "d"}
    assert m.position == (1, 4)
    assert m.buffer == []
    # a real loss shows again at the next event
    assert m.observe(env(6, WorkerRegistered(worker=rec("f")))) == Resync("gap")


def test_lost_and_bounded_buffer() -> None:
    m = synced(0)
    assert m.lost("reconnect") == Resync("reconnect")
    small = RegistryMirror(max_buffer=2)
    for seq in range(1, 6):
        small.observe(env(seq, WorkerRegistered(worker=rec(f"w{seq}"))))
    assert len(small.buffer) <= 2


def test_changes_name_the_records_events_touched_and_none_after_a_snapshot() -> None:
    m = synced(0, rec("a"), rec("b"))
    assert m.take_changes() is None  # a snapshot may have changed any record
    assert m.take_changes() == set()
    m.observe(env(1, ready("a")))
    m.observe(env(2, WorkerRegistered(worker=rec("c"))))
    m.observe(env(3, WorkerRemoved(worker=rec("b"))))
    assert m.take_changes() == {"a", "b", "c"}
    assert m.take_changes() == set()
    m.observe(env(5, ready("a", revision=3)))  # a gap: the snapshot replaces everything
    m.apply_snapshot(RegistrySnapshot(epoch=1, seq=5, workers=(rec("a", S.READY, 3),)))
    assert m.take_changes() is None


def test_changes_nobody_takes_stay_bounded() -> None:
    m = RegistryMirror(max_buffer=2)
    m.apply_snapshot(RegistrySnapshot(epoch=1, seq=0, workers=()))
    m.take_changes()
    for seq in range(1, 6):
        m.observe(env(seq, WorkerRegistered(worker=rec(f"w{seq}"))))
    assert m.take_changes() is None  # more than max_buffer: "any may have changed"
