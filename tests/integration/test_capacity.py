"""Capacity service with a real registry and nats-server: tiers, gaps, late readers, restarts."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from schemas import codec
from schemas.base import Envelope
from schemas.capacity import CapacityView
from schemas.registry import (
    CommandOk,
    RegisterRequest,
    RemoveRequest,
    ReplaceRequest,
    WorkerRecord,
    WorkerRegistered,
    WorkerSpec,
    WorkerStatus,
)
from schemas.subjects import Subjects
from services.capacity.shell import CapacityService
from services.common.bus import Bus
from services.common.run import Running
from services.registry.client import RegistryClient
from tests.helpers import delivered, eventually, until_counted
from tests.integration.fleet_fixtures import FAKE_WORKER, Heartbeats, record_views, running_capacity
from tests.integration.registry_fixtures import running_registry

pytestmark = pytest.mark.integration


def sample(cap: Running[CapacityService], name: str, **labels: str) -> float:
    """A capacity metric as /metrics shows it (0 for a labelled one never counted)."""
    value = cap.service.metrics.prometheus.get_sample_value(f"switchboard_capacity_{name}", labels)
    return value or 0.0


async def register(
    client: RegistryClient, url: str, mrr: int | None, models: tuple[str, ...] = ("m",)
) -> WorkerRecord:
    reply = await client.call(
        RegisterRequest(worker=WorkerSpec(url=url, models=models, max_running_requests=mrr))
    )
    assert isinstance(reply, CommandOk)
    assert reply.worker is not None
    return reply.worker


async def test_tiers_follow_the_fleet(bus: Bus, prefix: str, nats_url: str) -> None:
    views = await record_views(bus, prefix)
    client = RegistryClient(bus, Subjects.for_prefix(prefix), principal=FAKE_WORKER)
    async with (
        running_registry(nats_url, prefix, heartbeat_ttl_s=0.6),
        running_capacity(nats_url, prefix) as cap,
    ):
        await eventually(lambda: views.fleet() == (1024, "legacy_fallback"))
        a = await register(client, "http://a:1", 256)
        hb_a = Heartbeats(bus, prefix, a).start()
        await eventually(lambda: views.fleet() == (256, "worker_reported"))
        b = await register(client, "http://b:1", None, ("m", "n"))
        hb_b = Heartbeats(bus, prefix, b).start()
        await eventually(lambda: views.fleet() == (320, "mixed"))
        assert views.last is not None
        assert views.last.models["n"].capacity == 64
        # the safety property: a backend that stops heartbeating takes its capacity with it
        hb_a.stop()
        await eventually(lambda: views.fleet() == (64, "mixed"), timeout_s=5)
        hb_b.stop()
        await eventually(lambda: views.fleet() == (1024, "legacy_fallback"), timeout_s=5)
        for record in (a, b):
            await client.call(RemoveRequest(id=record.id))
        await eventually(lambda: views.last is not None and views.last.models == {})
        assert sample(cap, "current", model="*") == 1024
        assert sample(cap, "source", model="*", source="legacy_fallback") == 1


async def test_source_only_change_is_published(bus: Bus, prefix: str, nats_url: str) -> None:
    views = await record_views(bus, prefix)
    client = RegistryClient(bus, Subjects.for_prefix(prefix), principal=FAKE_WORKER)
    async with running_registry(nats_url, prefix), running_capacity(nats_url, prefix):
        a = await register(client, "http://a:1", 64)
        hb = Heartbeats(bus, prefix, a).start()
        try:
            await eventually(lambda: views.fleet() == (64, "worker_reported"))
            await client.call(
                ReplaceRequest(id=a.id, worker=WorkerSpec(url=a.url, models=a.models))
            )
            await eventually(lambda: views.fleet() == (64, "mixed"))
        finally:
            hb.stop()


async def test_gap_from_a_skipped_seq_resnapshots_and_converges(
    bus: Bus, prefix: str, nats_url: str
) -> None:
    views = await record_views(bus, prefix)
    client = RegistryClient(bus, Subjects.for_prefix(prefix), principal=FAKE_WORKER)
    async with (
        running_registry(nats_url, prefix) as reg,
        running_capacity(nats_url, prefix, checkpoint_interval_s=600) as cap,
    ):
        a = await register(client, "http://a:1", 100)
        hb = Heartbeats(bus, prefix, a).start()
        try:
            await eventually(lambda: views.fleet() == (100, "worker_reported"))
            # A bogus event far ahead in the sequence, claiming a worker the registry never had.
            epoch, seq = reg.service.sequencer.epoch, reg.service.sequencer.seq
            ghost = WorkerRecord(
                id="ghost",
                url="http://ghost:1",
                models=("m",),
                status=WorkerStatus.READY,
                revision=1,
                max_running_requests=5000,
            )
            started = time.perf_counter()
            await bus.publish(
                Subjects.for_prefix(prefix).registry_events,
                codec.encode(
                    Envelope(
                        source="registry",
                        epoch=epoch,
                        seq=seq + 5,
                        sent_at=0.0,
                        body=WorkerRegistered(worker=ghost),
                    )
                ),
            )
            await eventually(lambda: sample(cap, "resnapshots_total", reason="gap") == 1)
            converged = time.perf_counter() - started
            print(f"\nconvergence after a skipped seq: {converged * 1000:.1f} ms")
            assert "ghost" not in cap.service.follower.mirror.records
            assert views.fleet() == (100, "worker_reported")
            assert sample(cap, "sequence_gaps_total") == 1
        finally:
            hb.stop()


async def test_event_dropped_on_the_wire_is_noticed_by_beacon(
    bus: Bus, prefix: str, nats_url: str
) -> None:
    views = await record_views(bus, prefix)
    client = RegistryClient(bus, Subjects.for_prefix(prefix), principal=FAKE_WORKER)
    async with (
        running_registry(nats_url, prefix, beacon_interval_s=0.3) as reg,
        running_capacity(nats_url, prefix, checkpoint_interval_s=600) as cap,
    ):
        await eventually(lambda: views.fleet() == (1024, "legacy_fallback"))
        real_publish = reg.service.bus.publish
        dropped: list[str] = []

        async def lossy(subject: str, data: bytes, headers: Any = None) -> None:
            if subject.endswith("registry.events") and b"worker.registered" in data and not dropped:
                dropped.append(subject)  # this event never reaches the wire
                return
            await real_publish(subject, data, headers)

        reg.service.bus.publish = lossy  # type: ignore[method-assign]
        started = time.perf_counter()
        await register(client, "http://a:1", 42)
        assert dropped
        await eventually(
            lambda: "http://a:1" in {r.url for r in cap.service.follower.mirror.records.values()},
            timeout_s=5,
        )
        elapsed_ms = (time.perf_counter() - started) * 1000
        print(f"\nconvergence after a lost last event: {elapsed_ms:.1f} ms")
        assert sample(cap, "resnapshots_total", reason="beacon") == 1


async def test_late_reader_gets_current_view_at_once(bus: Bus, prefix: str, nats_url: str) -> None:
    client = RegistryClient(bus, Subjects.for_prefix(prefix), principal=FAKE_WORKER)
    subjects = Subjects.for_prefix(prefix)
    async with (
        running_registry(nats_url, prefix),
        running_capacity(nats_url, prefix, override=777) as cap,
    ):
        await eventually(lambda: cap.service.view is not None)
        await register(client, "http://a:1", 9)
        # a reader that arrives after the last change
        data = await bus.request(subjects.capacity_snapshot, b"", timeout_s=2)
        view = codec.decode(data, CapacityView)
        assert (view.fleet.capacity, view.fleet.source.value) == (777, "override")
        await eventually(lambda: "m" in cap.service.view.models if cap.service.view else False)
        kv = await bus.key_value(subjects.kv_bucket("capacity"), create=False)
        stored = codec.capacity_view_decoder.decode((await kv.get("view")).value or b"")
        assert stored.body == cap.service.view


async def test_registry_restart_keeps_capacity_right(bus: Bus, prefix: str, nats_url: str) -> None:
    views = await record_views(bus, prefix)
    client = RegistryClient(bus, Subjects.for_prefix(prefix), principal=FAKE_WORKER)
    async with running_capacity(nats_url, prefix, checkpoint_interval_s=600):
        async with running_registry(nats_url, prefix):
            a = await register(client, "http://a:1", 10)
            hb = Heartbeats(bus, prefix, a).start()
            await eventually(lambda: views.fleet() == (10, "worker_reported"))
        async with running_registry(nats_url, prefix):
            b = await register(client, "http://b:1", 20)
            hb2 = Heartbeats(bus, prefix, b).start()
            try:
                await eventually(lambda: views.fleet() == (30, "worker_reported"))
            finally:
                hb.stop()
                hb2.stop()


async def test_malformed_events_are_counted_and_survived(
    bus: Bus, prefix: str, nats_url: str
) -> None:
    views = await record_views(bus, prefix)
    client = RegistryClient(bus, Subjects.for_prefix(prefix), principal=FAKE_WORKER)
    events = Subjects.for_prefix(prefix).registry_events
    async with running_registry(nats_url, prefix), running_capacity(nats_url, prefix) as cap:
        await eventually(lambda: cap.service.follower.synced.is_set())

        def rejected() -> float:
            return sample(cap, "messages_rejected_total", subject="registry.events")

        base = await until_counted(
            lambda: bus.publish(events, b"probe"),
            rejected,
            barrier=lambda: delivered(bus, cap.service.bus),
        )
        for bad in (
            b"nonsense",
            b"{}",
            b'{"source":"registry","epoch":1,"seq":1,"sent_at":0,"body":{"type":"x"}}',
        ):
            await bus.publish(events, bad)
        await eventually(lambda: rejected() == base + 3)
        a = await register(client, "http://a:1", 5)
        hb = Heartbeats(bus, prefix, a).start()
        try:
            await eventually(lambda: views.fleet() == (5, "worker_reported"))
        finally:
            hb.stop()


async def test_snapshot_retries_until_the_registry_appears(
    bus: Bus, prefix: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    views = await record_views(bus, prefix)
    caplog.set_level(logging.WARNING, "services.registry.follower")
    async with running_capacity(nats_url, prefix, snapshot_timeout_s=0.2) as cap:
        # a whole snapshot attempt has failed (nobody answered within its timeout) ...
        await eventually(lambda: "registry snapshot failed" in caplog.text)
        # ... and no view was made up meanwhile (the view log sees what was published before)
        await delivered(cap.service.bus, bus)
        assert not cap.service.follower.synced.is_set()
        assert views.last is None
        async with running_registry(nats_url, prefix):
            await eventually(lambda: views.fleet() == (1024, "legacy_fallback"), timeout_s=5)
