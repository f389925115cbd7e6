"""The tail formatter: readable lines, gap and epoch markers, filters."""

from __future__ import annotations

from schemas import codec
from schemas.base import Envelope
from schemas.registry import RegistryBeacon, WorkerRecord, WorkerRegistered, WorkerStatus
from services.cli.tail import Filters, TailFormatter

REC = WorkerRecord(
    id="w1", url="http://h:1", models=("m1",), status=WorkerStatus.PENDING, revision=1
)


def env(seq: int, body: object, epoch: int = 1) -> bytes:
    return codec.encode(Envelope(source="registry", epoch=epoch, seq=seq, sent_at=0.0, body=body))


def test_lines_and_gap_marker() -> None:
    fmt = TailFormatter()
    first = fmt.lines("f.registry.events", env(1, WorkerRegistered(worker=REC)), 0.0)
    assert len(first) == 1
    assert "#1 worker.registered id=w1 url=http://h:1 models=m1 status=pending" in first[0]
    assert fmt.lines("f.registry.events", env(2, WorkerRegistered(worker=REC)), 0.0)[0].count("#2")
    gapped = fmt.lines("f.registry.events", env(5, WorkerRegistered(worker=REC)), 0.0)
    assert gapped[0].startswith("--- GAP on f.registry.events from registry: expected #3, got #5")
    assert "(2 lost)" in gapped[0]
    assert "#5" in gapped[1]
    assert len(fmt.lines("f.registry.events", env(6, WorkerRegistered(worker=REC)), 0.0)) == 1


def test_beacon_ahead_shows_lost_last_event_and_new_epoch() -> None:
    fmt = TailFormatter()
    fmt.lines("f.registry.events", env(3, WorkerRegistered(worker=REC)), 0.0)
    assert len(fmt.lines("f.registry.events", env(3, RegistryBeacon(last_seq=3)), 0.0)) == 1
    lost = fmt.lines("f.registry.events", env(4, RegistryBeacon(last_seq=4)), 0.0)
    assert lost[0].startswith("--- GAP")
    assert "(1 lost)" in lost[0]
    epoch = fmt.lines("f.registry.events", env(1, WorkerRegistered(worker=REC), epoch=2), 0.0)
    assert epoch[0].startswith("--- NEW EPOCH")


def test_not_an_envelope_is_shown_not_dropped() -> None:
    assert "(not an envelope)" in TailFormatter().lines("f.x", b"hello", 0.0)[0]


def test_filters() -> None:
    fmt = TailFormatter(Filters(worker="w2"))
    assert fmt.lines("f.registry.events", env(1, WorkerRegistered(worker=REC)), 0.0) == []
    fmt = TailFormatter(Filters(model="m1", type="worker."))
    assert len(fmt.lines("f.registry.events", env(1, WorkerRegistered(worker=REC)), 0.0)) == 1
    fmt = TailFormatter(Filters(type="registry.beacon"))
    assert fmt.lines("f.registry.events", env(1, WorkerRegistered(worker=REC)), 0.0) == []
