"""Registry heartbeats at fleet scale: one that changes nothing is taken without the lock and
writes and publishes nothing; one that changes a status takes the one path every change takes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from schemas import codec
from schemas.load import ModelLoad, WorkerLoad
from schemas.registry import (
    CommandOk,
    CommandReply,
    RegisterRequest,
    SetStatusRequest,
    WorkerRecord,
    WorkerSpec,
    WorkerStatus,
    WorkerStatusChanged,
)
from schemas.subjects import Subjects
from services.common.bus import Bus
from services.common.seq import Sequencer
from services.registry.client import RegistryClient
from services.registry.effects import Write
from services.registry.shell import Registry
from tests.helpers import delivered, eventually
from tests.integration.fleet_fixtures import FAKE_WORKER
from tests.integration.registry_fixtures import EventLog, record_events, running_registry

pytestmark = pytest.mark.integration
S = WorkerStatus
# No expiry during a test: only the heartbeats below change a status.
TTL_S = 60.0


class Beats:
    """One worker's heartbeats, one at a time, as its owner publishes them."""

    def __init__(self, bus: Bus, prefix: str, record: WorkerRecord) -> None:
        self.bus, self.record = bus, record
        self.subject = Subjects.for_prefix(prefix).load(FAKE_WORKER, record.id)
        self.sequencer = Sequencer(record.id, epoch=time.time_ns())

    async def send(self, status: WorkerStatus = S.READY) -> float:
        """Publish one; returns the time it was sent (the registry hears it at or after)."""
        load = WorkerLoad(
            worker_id=self.record.id,
            url=self.record.url,
            status=status,
            models=(
                ModelLoad(id="m1", in_flight=0, queue_depth=0, max_in_flight=4, max_queue_depth=8),
            ),
        )
        sent = time.time()
        await self.bus.publish(self.subject, codec.encode(self.sequencer.stamp(load, sent)))
        return sent


class Writes:
    """Every KV write the registry makes, with whether its lock was held; `hold` stops the next
    one until `release` is set (a change caught between its plan and its commit)."""

    def __init__(self, service: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
        self.locked: list[bool] = []
        self.hold = False
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        original: Callable[[tuple[Write, ...]], Awaitable[None]] = service.store.apply

        async def apply(writes: tuple[Write, ...]) -> None:
            self.locked.append(service.lock.locked())
            if self.hold:
                self.hold = False
                self.held.set()
                await self.release.wait()
            await original(writes)

        monkeypatch.setattr(service.store, "apply", apply)


def ok(reply: CommandReply) -> CommandOk:
    assert isinstance(reply, CommandOk), reply
    return reply


def statuses(log: EventLog) -> list[tuple[WorkerStatus, WorkerStatus, str]]:
    return [
        (b.old_status, b.new_status, b.reason)
        for b in log.bodies()
        if isinstance(b, WorkerStatusChanged)
    ]


async def ready_worker(bus: Bus, prefix: str, service: Registry) -> tuple[WorkerRecord, Beats]:
    """A worker registered by its owner and made Ready by its first heartbeat."""
    client = RegistryClient(bus, Subjects.for_prefix(prefix), principal=FAKE_WORKER)
    spec = WorkerSpec(url="http://10.2.0.1:8000", models=("m1",))
    record = ok(await client.call(RegisterRequest(worker=spec))).worker
    assert record is not None
    beats = Beats(bus, prefix, record)
    await beats.send()
    await eventually(lambda: service.book.records[record.id].status == S.READY)
    return record, beats


async def test_a_heartbeat_that_changes_nothing_takes_no_lock_and_writes_nothing(
    bus: Bus, prefix: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await record_events(bus, prefix)
    async with running_registry(nats_url, prefix, heartbeat_ttl_s=TTL_S) as reg:
        service = reg.service
        writes = Writes(service, monkeypatch)
        record, beats = await ready_worker(bus, prefix, service)
        await eventually(lambda: len(log.events) == 2)  # registered; Pending -> Ready
        written = len(writes.locked)
        assert written >= 1

        async def heard(sent: float) -> None:
            await eventually(lambda: service.heard_at.get(record.id, 0.0) >= sent)
            assert service.book.last_heartbeat[record.id] >= sent

        async with service.lock:  # as a command would, for as long as it takes
            for _ in range(3):
                await heard(await beats.send())  # while the lock is held: it never waited
        await delivered(service.bus, bus)  # an event it had published would be in the log now
        assert len(writes.locked) == written  # no KV write
        assert len(log.events) == 2  # no event
        assert service.book.records[record.id].revision == 2


async def test_a_heartbeat_that_changes_a_status_takes_the_lock_writes_and_publishes(
    bus: Bus, prefix: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await record_events(bus, prefix)
    async with running_registry(nats_url, prefix, heartbeat_ttl_s=TTL_S) as reg:
        service = reg.service
        writes = Writes(service, monkeypatch)
        record, beats = await ready_worker(bus, prefix, service)
        operator = RegistryClient(bus, Subjects.for_prefix(prefix))
        ok(await operator.call(SetStatusRequest(id=record.id, status=S.NOT_READY)))
        written = len(writes.locked)
        await beats.send()
        await eventually(lambda: service.book.records[record.id].status == S.READY)
        await eventually(lambda: len(statuses(log)) == 3)
        assert statuses(log) == [
            (S.PENDING, S.READY, "heartbeat"),
            (S.READY, S.NOT_READY, ""),
            (S.NOT_READY, S.READY, "heartbeat"),
        ]
        log.assert_contiguous()
        # each status change written once, under the lock, as every change is
        assert writes.locked == [True] * len(writes.locked)
        assert len(writes.locked) == written + 1
        assert service.book.records[record.id].revision == 4


async def test_a_heartbeat_during_a_change_to_its_worker_waits_for_that_change(
    bus: Bus, prefix: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planned on the record the change is replacing, it would see nothing to do; after the
    change (NotReady) it puts the worker back to Ready, as it always did."""
    log = await record_events(bus, prefix)
    async with running_registry(nats_url, prefix, heartbeat_ttl_s=TTL_S) as reg:
        service = reg.service
        writes = Writes(service, monkeypatch)
        record, beats = await ready_worker(bus, prefix, service)
        operator = RegistryClient(bus, Subjects.for_prefix(prefix))
        writes.hold = True
        change = asyncio.create_task(
            operator.call(SetStatusRequest(id=record.id, status=S.NOT_READY))
        )
        await asyncio.wait_for(writes.held.wait(), 5.0)  # planned, not yet committed
        await beats.send()
        await delivered(bus, service.bus)  # the heartbeat is in the registry's hands
        writes.release.set()
        ok(await change)
        await eventually(lambda: len(statuses(log)) == 3)
        assert [s[:2] for s in statuses(log)] == [
            (S.PENDING, S.READY),
            (S.READY, S.NOT_READY),
            (S.NOT_READY, S.READY),
        ]
        assert service.book.records[record.id].status == S.READY
