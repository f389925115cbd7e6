"""Capacity shell on the in-memory bus: bad events, late readers, gaps, connection trouble, crashes.

The test plays the registry (snapshots on request, numbered events); the real-NATS versions of
these paths are in tests/integration/test_capacity.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from schemas import codec
from schemas.base import Envelope
from schemas.capacity import CapacityView
from schemas.registry import RegistrySnapshot, WorkerRecord, WorkerRegistered, WorkerStatus
from schemas.subjects import Subjects
from services.capacity.core import CapacitySettings
from services.capacity.shell import VIEW_KEY, CapacityMetrics, CapacityService, ViewStore
from services.common.bus import Message, reply
from tests.helpers import eventually
from tests.memory_bus import MemoryBus, MemoryKV

SUBJECTS = Subjects.for_prefix("unit")


class FakeRegistry:
    """The registry as capacity sees it: a snapshot on request, then numbered events."""

    def __init__(self, bus: MemoryBus, epoch: int = 7) -> None:
        self.bus, self.epoch, self.seq = bus, epoch, 0
        self.records: dict[str, WorkerRecord] = {}
        self.snapshots = 0  # requests answered

    async def serve(self) -> None:
        await self.bus.subscribe(SUBJECTS.registry_snapshot, queue="registry", cb=self._snapshot)

    async def _snapshot(self, msg: Message) -> None:
        self.snapshots += 1
        workers = tuple(self.records.values())
        await reply(
            msg, codec.encode(RegistrySnapshot(epoch=self.epoch, seq=self.seq, workers=workers))
        )

    async def register(self, worker_id: str, slots: int, *, lost: bool = False) -> None:
        """A Ready worker; `lost`: its event is numbered but never reaches the wire."""
        record = WorkerRecord(
            id=worker_id,
            url=f"http://{worker_id}:1",
            models=("m",),
            status=WorkerStatus.READY,
            revision=1,
            max_running_requests=slots,
        )
        self.records[worker_id] = record
        self.seq += 1
        if not lost:
            event = WorkerRegistered(worker=record)
            env = Envelope(
                source="registry", epoch=self.epoch, seq=self.seq, sent_at=0.0, body=event
            )
            await self.bus.publish(SUBJECTS.registry_events, codec.encode(env))


class FlakyKV(MemoryKV):
    """A store whose next put fails once `fail_next` is set (a JetStream hiccup)."""

    fail_next = False

    async def put(self, key: str, value: bytes) -> int:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("KV put failed")
        return await super().put(key, value)


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    b = MemoryBus()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def registry(bus: MemoryBus) -> FakeRegistry:
    fake = FakeRegistry(bus)
    await fake.serve()
    return fake


@contextlib.asynccontextmanager
async def capacity(bus: MemoryBus, kv: ViewStore | None = None) -> AsyncIterator[CapacityService]:
    """The service as main.py runs it, with short timeouts and no periodic re-snapshot."""
    service = CapacityService(
        bus,
        kv or MemoryKV(),
        SUBJECTS,
        CapacitySettings(),
        CapacityMetrics(CollectorRegistry()),
        checkpoint_interval_s=600,
        snapshot_timeout_s=0.05,
        restart_s=0.01,
    )
    await service.start()
    supervisor = asyncio.create_task(service.supervise())
    try:
        yield service
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor


def sample(service: CapacityService, name: str, **labels: str) -> float:
    value = service.metrics.prometheus.get_sample_value(f"switchboard_capacity_{name}", labels)
    return value or 0.0


def fleet(service: CapacityService) -> tuple[int, str] | None:
    view = service.view
    return None if view is None else (view.fleet.capacity, view.fleet.source.value)


def stored_fleet(kv: MemoryKV) -> int | None:
    data = kv.values.get(VIEW_KEY)
    return None if data is None else codec.capacity_view_decoder.decode(data).body.fleet.capacity


async def synced(service: CapacityService) -> None:
    await asyncio.wait_for(service.follower.synced.wait(), 5)


async def test_a_bad_registry_event_is_counted_and_the_subscription_survives(
    bus: MemoryBus, registry: FakeRegistry
) -> None:
    async with capacity(bus) as service:
        await synced(service)
        unknown = b'{"source":"registry","epoch":7,"seq":1,"sent_at":0,"body":{"type":"x"}}'
        for bad in (b"nonsense", b"{}", unknown):
            await bus.publish(SUBJECTS.registry_events, bad)
        await bus.settled()
        assert sample(service, "messages_rejected_total", subject="registry.events") == 3
        await registry.register("a", 5)
        await eventually(lambda: fleet(service) == (5, "worker_reported"))
        assert registry.snapshots == 1  # a bad message is not a loss: no re-snapshot


async def test_a_snapshot_request_is_answered_with_the_latest_view(
    bus: MemoryBus, registry: FakeRegistry
) -> None:
    published: list[Envelope[CapacityView]] = []

    async def on_view(msg: Message) -> None:
        published.append(codec.capacity_view_decoder.decode(msg.data))

    await bus.subscribe(SUBJECTS.capacity_view, cb=on_view)
    kv = MemoryKV()
    async with capacity(bus, kv) as service:
        await registry.register("a", 5)
        await registry.register("b", 7)
        await eventually(lambda: fleet(service) == (12, "worker_reported"))
        answer = codec.decode(
            await bus.request(SUBJECTS.capacity_snapshot, b"", timeout_s=1), CapacityView
        )
        assert answer == service.view
        assert (answer.fleet.capacity, answer.registry_epoch, answer.registry_seq) == (12, 7, 2)
        assert stored_fleet(kv) == 12
        await bus.settled()
        assert published[-1].body == answer
        seqs = [env.seq for env in published]
        assert seqs == sorted(set(seqs))


async def test_a_reader_before_the_first_view_waits_for_it(bus: MemoryBus) -> None:
    registry = FakeRegistry(bus)  # not answering yet
    async with capacity(bus) as service:
        asking = asyncio.create_task(bus.request(SUBJECTS.capacity_snapshot, b"", timeout_s=5))
        await bus.flush()
        assert service.view is None
        assert not asking.done()  # no made-up default while the registry is silent
        await registry.serve()
        answer = codec.decode(await asking, CapacityView)
        assert (answer.fleet.capacity, answer.fleet.source.value) == (1024, "legacy_fallback")


async def test_a_gap_triggers_a_resnapshot(bus: MemoryBus, registry: FakeRegistry) -> None:
    async with capacity(bus) as service:
        await registry.register("a", 1)
        await eventually(lambda: fleet(service) == (1, "worker_reported"))
        await registry.register("b", 10, lost=True)
        await registry.register("c", 100)  # seq 3 right after seq 1
        await eventually(lambda: fleet(service) == (111, "worker_reported"))
        assert sample(service, "resnapshots_total", reason="gap") == 1
        assert sample(service, "sequence_gaps_total") == 1
        assert registry.snapshots == 2  # at start, and after the gap


async def test_connection_trouble_on_registry_events_resnapshots(
    bus: MemoryBus, registry: FakeRegistry
) -> None:
    async with capacity(bus) as service:
        await synced(service)
        await bus.slow_consumer(SUBJECTS.capacity_snapshot)  # not the events: nothing lost
        await bus.reconnect()
        await eventually(lambda: sample(service, "resnapshots_total", reason="reconnect") == 1)
        # the follower takes its queue in order: had the first one counted, it would show now
        assert sample(service, "resnapshots_total", reason="slow_consumer") == 0
        await bus.slow_consumer(SUBJECTS.registry_events)
        await eventually(lambda: sample(service, "resnapshots_total", reason="slow_consumer") == 1)
        assert registry.snapshots == 3


async def test_a_crashed_follower_restarts_from_a_snapshot(
    bus: MemoryBus, registry: FakeRegistry
) -> None:
    kv = FlakyKV()
    async with capacity(bus, kv) as service:
        await eventually(lambda: stored_fleet(kv) == 1024)
        kv.fail_next = True
        await registry.register("a", 3)
        await eventually(lambda: sample(service, "resnapshots_total", reason="restart") == 1)
        await registry.register("b", 4)
        await eventually(lambda: stored_fleet(kv) == 7)


async def test_a_view_whose_store_failed_is_stored_after_the_restart(
    bus: MemoryBus, registry: FakeRegistry
) -> None:
    kv = FlakyKV()
    async with capacity(bus, kv) as service:
        await eventually(lambda: stored_fleet(kv) == 1024)
        kv.fail_next = True
        await registry.register("a", 3)
        await eventually(lambda: sample(service, "resnapshots_total", reason="restart") == 1)
        await eventually(lambda: stored_fleet(kv) == 3, timeout_s=1)
