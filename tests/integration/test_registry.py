"""Registry against a real nats-server: races, durability, liveness, events, bad input."""

from __future__ import annotations

import asyncio
import time

import pytest

from schemas import codec
from schemas.base import Envelope
from schemas.registry import (
    CommandError,
    CommandOk,
    RegisterRequest,
    RegistrySnapshot,
    RemoveRequest,
    ReplaceRequest,
    SetStatusRequest,
    UpsertRequest,
    WorkerRegistered,
    WorkerRemoved,
    WorkerReplaced,
    WorkerSpec,
    WorkerStatus,
    WorkerStatusChanged,
)
from schemas.subjects import Subjects
from services.common.bus import Bus
from services.registry.client import RegistryClient
from tests.helpers import delivered, eventually, until_counted
from tests.integration.fleet_fixtures import FAKE_WORKER, Heartbeats
from tests.integration.registry_fixtures import record_events, running_registry

pytestmark = pytest.mark.integration
S = WorkerStatus
EVENT_REGISTERED = {"type": "worker.registered"}


def spec(url: str = "http://10.1.0.1:8000", models: tuple[str, ...] = ("m1",)) -> WorkerSpec:
    return WorkerSpec(url=url, models=models)


def ok(reply: object) -> CommandOk:
    assert isinstance(reply, CommandOk), reply
    return reply


async def test_hundred_concurrent_registers_one_winner(
    bus: Bus, prefix: str, nats_url: str
) -> None:
    log = await record_events(bus, prefix)
    async with running_registry(nats_url, prefix) as reg:
        client = RegistryClient(bus, Subjects.for_prefix(prefix))
        replies = await asyncio.gather(
            *(client.call(RegisterRequest(worker=spec())) for _ in range(100))
        )
        wins = [r for r in replies if isinstance(r, CommandOk)]
        losses = [r for r in replies if isinstance(r, CommandError)]
        assert len(wins) == 1
        assert len(losses) == 99
        assert {r.code for r in losses} == {"conflict"}
        assert len(reg.service.book.records) == 1
        # Every command has been answered, so every event is out: exactly one was published...
        assert reg.service.sequencer.seq == 1
        samples = reg.service.metrics.prometheus
        assert samples.get_sample_value("switchboard_registry_events_total", EVENT_REGISTERED) == 1
        # ...and it is the one that reaches a subscriber.
        await eventually(lambda: [type(b) for b in log.bodies()] == [WorkerRegistered])


async def test_concurrent_replaces_leave_no_stale_model_entries(
    bus: Bus, prefix: str, nats_url: str
) -> None:
    async with running_registry(nats_url, prefix) as reg:
        client = RegistryClient(bus, Subjects.for_prefix(prefix))
        wid = ok(await client.call(RegisterRequest(worker=spec(models=("base",))))).worker.id  # type: ignore[union-attr]
        model_sets = [tuple(f"m{j}" for j in range(i % 5, i % 5 + 3)) for i in range(40)]
        await asyncio.gather(
            *(client.call(ReplaceRequest(id=wid, worker=spec(models=ms))) for ms in model_sets)
        )
        book = reg.service.book
        final = book.records[wid]
        assert {m for m, ids in book.model_index.items() if wid in ids} == set(final.models)
        # And the durable copy agrees with memory.
        stored = codec.decode(
            (await reg.service.store.kv.get(f"workers.{wid}")).value or b"", type(final)
        )
        assert stored == final


async def test_upsert_and_url_conflict_on_replace(bus: Bus, prefix: str, nats_url: str) -> None:
    async with running_registry(nats_url, prefix) as reg:
        client = RegistryClient(bus, Subjects.for_prefix(prefix))
        created = ok(await client.call(UpsertRequest(worker=spec("http://a:1"))))
        assert created.applied
        assert created.worker is not None
        same = ok(await client.call(UpsertRequest(worker=spec("http://a:1"))))
        assert not same.applied
        assert same.worker is not None
        assert same.worker.id == created.worker.id
        changed = ok(await client.call(UpsertRequest(worker=spec("http://a:1", ("m2",)))))
        assert changed.applied
        assert changed.worker is not None
        assert changed.worker.revision == 2
        other = ok(await client.call(RegisterRequest(worker=spec("http://b:1"))))
        assert other.worker is not None
        before = dict(reg.service.book.records)
        refused = await client.call(ReplaceRequest(id=other.worker.id, worker=spec("http://a:1")))
        assert isinstance(refused, CommandError)
        assert refused.code == "conflict"
        assert reg.service.book.records == before
        missing = await client.call(ReplaceRequest(id="w-nope", worker=spec("http://c:1")))
        assert isinstance(missing, CommandError)
        assert missing.code == "not_found"


async def test_restart_keeps_records_and_continues_sequence(
    bus: Bus, prefix: str, nats_url: str
) -> None:
    log = await record_events(bus, prefix)
    client = RegistryClient(bus, Subjects.for_prefix(prefix))
    async with running_registry(nats_url, prefix) as reg:
        a = ok(await client.call(RegisterRequest(worker=spec("http://a:1")))).worker
        ok(await client.call(SetStatusRequest(id=a.id, status=S.DRAINING)))  # type: ignore[union-attr]
        ok(await client.call(RegisterRequest(worker=spec("http://b:1"))))
        before = dict(reg.service.book.records)
        epoch = reg.service.sequencer.epoch
    async with running_registry(nats_url, prefix) as reg2:
        assert reg2.service.book.records == before
        assert reg2.service.sequencer.epoch == epoch
        assert reg2.service.sequencer.seq == 3
        # the gauge tells the restored position at once, not 0 until the next event
        samples = reg2.service.metrics.prometheus
        assert samples.get_sample_value("switchboard_registry_seq") == 3
        ok(await client.call(RemoveRequest(id=a.id)))  # type: ignore[union-attr]
        await eventually(lambda: len(log.events) == 4)
    assert [e.seq for e in log.events] == [1, 2, 3, 4]
    assert {e.epoch for e in log.events} == {epoch}


async def client_snapshot(bus: Bus, prefix: str) -> RegistrySnapshot:
    return await RegistryClient(bus, Subjects.for_prefix(prefix)).snapshot()


async def test_heartbeat_ttl_not_ready_then_ready(bus: Bus, prefix: str, nats_url: str) -> None:
    log = await record_events(bus, prefix)
    subjects = Subjects.for_prefix(prefix)
    async with running_registry(nats_url, prefix, heartbeat_ttl_s=1.0):
        client = RegistryClient(bus, subjects, principal=FAKE_WORKER)
        rec = ok(await client.call(RegisterRequest(worker=spec()))).worker
        assert rec is not None
        beats = Heartbeats(bus, prefix, rec).start()
        try:

            def statuses() -> list[tuple[WorkerStatus, WorkerStatus]]:
                return [
                    (b.old_status, b.new_status)
                    for b in log.bodies()
                    if isinstance(b, WorkerStatusChanged)
                ]

            await eventually(lambda: statuses() == [(S.PENDING, S.READY)])
            beats.stop()
            stopped_at = time.monotonic()
            await eventually(lambda: len(statuses()) == 2, timeout_s=3.0)
            # within TTL + 1 s of the last heartbeat
            assert time.monotonic() - stopped_at <= 1.0 + 1.0 + 0.2
            assert statuses()[1] == (S.READY, S.NOT_READY)
            # the registry still tells when it last heard the dead worker (for `status`)
            heard = (await client_snapshot(bus, prefix)).heard_at[rec.id]
            assert time.time() - 3.5 <= heard <= time.time() - 1.0
            beats.start()
            await eventually(lambda: len(statuses()) == 3)
            assert statuses()[2] == (S.NOT_READY, S.READY)
        finally:
            beats.stop()


async def test_every_operation_emits_exactly_the_core_events(
    bus: Bus, prefix: str, nats_url: str
) -> None:
    log = await record_events(bus, prefix)
    async with running_registry(nats_url, prefix):
        client = RegistryClient(bus, Subjects.for_prefix(prefix))
        rec = ok(await client.call(RegisterRequest(worker=spec()))).worker
        assert rec is not None
        ok(await client.call(SetStatusRequest(id=rec.id, status=S.READY)))
        ok(await client.call(ReplaceRequest(id=rec.id, worker=spec(models=("m2",)))))
        ok(await client.call(SetStatusRequest(id=rec.id, status=S.READY)))  # no-op: no event
        ok(await client.call(RemoveRequest(id=rec.id)))
        await eventually(lambda: len(log.events) == 4)
        await eventually(lambda: log.beacons and log.beacons[-1].seq == 4, timeout_s=3)
    kinds = [type(b) for b in log.bodies()]
    assert kinds == [WorkerRegistered, WorkerStatusChanged, WorkerReplaced, WorkerRemoved]
    log.assert_contiguous()
    assert log.events[0].seq == 1


@pytest.mark.parametrize(
    ("op", "payload", "needle"),
    [
        ("register", b"{not json", "bad register request"),
        ("register", b'{"worker": {"url": "nope", "models": []}}', "url"),
        ("register", b'{"worker": {"url": "http://x:1", "models": ["a b"]}}', "models"),
        ("replace", b'{"id": "w.1", "worker": {"url": "http://x:1", "models": []}}', "id"),
        ("set_status", b'{"id": "w1", "status": "sleepy"}', "status"),
        ("remove", b'{"id": "$bad"}', "id"),
        (
            "register",
            b'{"worker": {"url": "http://x:1", "models": ["a"], "model_slots": {"b": 8}}}',
            "model_slots",
        ),
        ("explode", b"{}", "unknown op"),
        ("wcmd.worker-1.explode", b"{}", "unknown op"),  # a worker's subject: the same answer
    ],
)
async def test_bad_commands_get_invalid_and_change_nothing(
    bus: Bus, prefix: str, nats_url: str, op: str, payload: bytes, needle: str
) -> None:
    subject = f"{prefix}.registry.{op}" if op.startswith("wcmd.") else f"{prefix}.registry.cmd.{op}"
    async with running_registry(nats_url, prefix) as reg:
        data = await bus.request(subject, payload, timeout_s=3)
        result = codec.command_reply_decoder.decode(data)
        assert isinstance(result, CommandError)
        assert result.code == "invalid"
        assert needle in result.message
        assert reg.service.book.records == {}
        # the service keeps running
        ok(
            await RegistryClient(bus, Subjects.for_prefix(prefix)).call(
                RegisterRequest(worker=spec())
            )
        )


async def test_bad_heartbeat_is_counted_and_ignored(bus: Bus, prefix: str, nats_url: str) -> None:
    async with running_registry(nats_url, prefix) as reg:
        samples = reg.service.metrics.prometheus
        subjects = Subjects.for_prefix(prefix)

        def rejected() -> float:
            value = samples.get_sample_value(
                "switchboard_registry_messages_rejected_total", {"subject": "load"}
            )
            return value or 0.0

        base = await until_counted(
            lambda: bus.publish(subjects.load("p", "w0"), b"probe"),
            rejected,
            barrier=lambda: delivered(bus, reg.service.bus),
        )
        await bus.publish(subjects.load("p", "w1"), b"garbage")
        await bus.publish(
            subjects.load("p", "w1"),
            codec.encode(Envelope(source="w1", epoch=1, seq=1, sent_at=0.0, body={"x": 1})),
        )
        await eventually(lambda: rejected() == base + 2)
        snap = await RegistryClient(bus, Subjects.for_prefix(prefix)).snapshot()
        assert snap.workers == ()
