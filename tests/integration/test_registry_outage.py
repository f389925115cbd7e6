"""Registry through a NATS outage: writes get `unavailable` and leave no trace; no false expiry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from schemas import codec
from schemas.registry import (
    Command,
    CommandError,
    CommandOk,
    RegisterRequest,
    RemoveRequest,
    ReplaceRequest,
    SetStatusRequest,
    UpsertRequest,
    WorkerRecord,
    WorkerRegistered,
    WorkerSpec,
    WorkerStatus,
    WorkerStatusChanged,
)
from schemas.subjects import Subjects
from services.cli.natsd import NatsServer
from services.common.bus import KV, Bus
from services.common.run import Running
from services.registry.client import RegistryClient
from services.registry.shell import Registry
from tests.helpers import assert_error_envelope, eventually, free_port, post
from tests.integration.fleet_fixtures import FAKE_WORKER, Heartbeats
from tests.integration.registry_fixtures import record_events, running_registry

pytestmark = pytest.mark.integration
S = WorkerStatus
# Well under the 5 s a JetStream request waits before it gives up.
PROMPT_S = 1.0


@pytest.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server of this test's own, so stopping it breaks no other test."""
    server = NatsServer(tmp_path / "nats", port=free_port())
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def outage(server: NatsServer, reg: Running[Registry]) -> None:
    await asyncio.to_thread(server.stop)
    await eventually(lambda: not reg.service.bus.connected)


async def recovery(server: NatsServer, reg: Running[Registry]) -> None:
    await asyncio.to_thread(server.start)  # same port, same JetStream store
    await eventually(lambda: reg.service.bus.connected, timeout_s=10)


async def kv_ready(kv: KV) -> bool:
    """JetStream answers again after the restart (it recovers its streams first)."""
    try:
        await kv.get("meta.sequence")
    except Exception:
        return False
    return True


async def kv_records(kv: KV) -> list[WorkerRecord]:
    keys = [k for k in await kv.keys() if k.startswith("workers.")]
    return [codec.decode(bytes((await kv.get(k)).value or b""), WorkerRecord) for k in keys]


async def test_writes_during_an_outage_get_503_and_leave_no_ghost(
    own_nats: NatsServer, prefix: str
) -> None:
    bus = await Bus.connect(own_nats.url, "test")
    log = await record_events(bus, prefix)
    try:
        async with running_registry(own_nats.url, prefix) as reg, aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{reg.http.port}"
            status, body, _ = await post(
                s, f"{base}/workers", {"url": "http://10.9.0.1:8000", "models": ["m"]}
            )
            assert status == 201
            kept = codec.decode(codec.encode(body["worker"]), WorkerRecord)
            await eventually(lambda: len(log.events) == 1)
            seq_before = log.events[-1].seq

            await outage(own_nats, reg)
            started = time.monotonic()
            ghost = {"url": "http://10.9.0.2:8000", "models": ["m"]}
            status, body, _ = await post(s, f"{base}/workers", ghost)
            assert time.monotonic() - started < PROMPT_S
            assert status == 503
            assert_error_envelope(body, "unavailable", "service_unavailable_error")
            async with s.get(f"{base}/workers") as resp:
                listed = (await resp.json())["workers"]
            assert [w["url"] for w in listed] == ["http://10.9.0.1:8000"]

            # The NATS command path (on_command hands its request to the same dispatch).
            spec = WorkerSpec(url="http://10.9.0.3:8000", models=("m",))
            requests: list[Command] = [
                RegisterRequest(worker=spec),
                UpsertRequest(worker=spec),
                ReplaceRequest(id=kept.id, worker=spec),
                SetStatusRequest(id=kept.id, status=S.DRAINING),
                RemoveRequest(id=kept.id),
            ]
            for request in requests:
                started = time.monotonic()
                result = await reg.service.dispatch(request)
                assert time.monotonic() - started < PROMPT_S, request.op
                assert isinstance(result, CommandError), (request.op, result)
                assert result.code == "unavailable", (request.op, result)
            assert list(reg.service.book.records.values()) == [kept]
            assert reg.service.book.url_index == {kept.url: kept.id}

            await recovery(own_nats, reg)
            await eventually(lambda: bus.connected, timeout_s=10)
            await bus.flush()  # our event subscription is back on the server
            kv = reg.service.store.kv
            await eventually(lambda: kv_ready(kv), timeout_s=10)
            assert await kv_records(kv) == [kept]
            # A change after the outage gets the very next seq: none was reserved or published.
            status, body, _ = await post(
                s, f"{base}/workers", {"url": "http://10.9.0.4:8000", "models": ["m"]}
            )
            assert status == 201
            await eventually(lambda: len(log.events) == 2, timeout_s=10)
            assert log.events[-1].seq == seq_before + 1
            registered = [b.worker.url for b in log.bodies() if isinstance(b, WorkerRegistered)]
            assert registered == ["http://10.9.0.1:8000", "http://10.9.0.4:8000"]
            assert sorted(r.url for r in await kv_records(kv)) == [
                "http://10.9.0.1:8000",
                "http://10.9.0.4:8000",
            ]
    finally:
        await bus.close()


async def test_any_kv_failure_rolls_back_not_only_cas_conflicts(
    bus: Bus, prefix: str, nats_url: str
) -> None:
    """NATS is up but the KV bucket is gone: writes fail (no CAS conflict) and change nothing."""
    async with running_registry(nats_url, prefix) as reg, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{reg.http.port}"
        status, body, _ = await post(
            s, f"{base}/workers", {"url": "http://10.7.0.1:8000", "models": ["m"]}
        )
        assert status == 201
        wid = body["worker"]["id"]
        await bus.nc.jetstream().delete_key_value(Subjects.for_prefix(prefix).kv_bucket("registry"))
        before = dict(reg.service.book.records)

        async with s.patch(f"{base}/workers/{wid}", json={"status": "draining"}) as resp:
            assert resp.status == 503
            assert_error_envelope(await resp.json(), "unavailable", "service_unavailable_error")
        async with s.delete(f"{base}/workers/{wid}") as resp:
            assert resp.status == 503
        status, body, _ = await post(
            s, f"{base}/workers", {"url": "http://10.7.0.2:8000", "models": ["m"]}
        )
        assert status == 503
        assert reg.service.book.records == before


async def test_heartbeating_workers_stay_ready_through_a_short_outage(
    own_nats: NatsServer, prefix: str
) -> None:
    """No worker goes NotReady because heartbeats could not reach the registry during an outage,
    even when its own connection comes back after the registry's (the worst order)."""
    ttl = 1.5
    bus = await Bus.connect(own_nats.url, "test")
    log = await record_events(bus, prefix)
    beats: list[Heartbeats] = []
    try:
        async with running_registry(own_nats.url, prefix, heartbeat_ttl_s=ttl) as reg:
            client = RegistryClient(bus, Subjects.for_prefix(prefix), principal=FAKE_WORKER)
            for i in range(3):
                reply = await client.call(
                    RegisterRequest(worker=WorkerSpec(url=f"http://10.8.0.{i}:8000", models=("m",)))
                )
                assert isinstance(reply, CommandOk)
                assert reply.worker is not None
                beats.append(Heartbeats(bus, prefix, reply.worker).start())
            book = reg.service.book
            await eventually(lambda: {r.status for r in book.records.values()} == {S.READY})
            ticks = count_expiry_ticks(reg)
            not_ready: list[tuple[str, WorkerStatus]] = []
            watcher = asyncio.create_task(watch_not_ready(reg, not_ready))
            try:
                for heartbeat in beats:  # the workers' connection is down too
                    heartbeat.stop()
                await bus.flush()  # nothing of theirs stays buffered to arrive at the reconnect
                await outage(own_nats, reg)
                # Down long enough that every worker missed more than a TTL of heartbeats.
                await eventually(
                    lambda: (
                        min(reg.service.clock() - t for t in book.last_heartbeat.values()) > ttl
                    ),
                    timeout_s=10,
                )
                await recovery(own_nats, reg)
                await eventually(lambda: kv_ready(reg.service.store.kv), timeout_s=10)
                # The registry checks expiry twice with KV writable before any worker is back.
                seen = len(ticks)
                await eventually(lambda: len(ticks) >= seen + 2, timeout_s=10)
                resumed_at = reg.service.clock()
                for heartbeat in beats:
                    heartbeat.start()
                await eventually(lambda: min(book.last_heartbeat.values()) > resumed_at)
                seen = len(ticks)
                await eventually(lambda: len(ticks) >= seen + 2, timeout_s=10)
            finally:
                watcher.cancel()
            assert not_ready == []
            changes = [b for b in log.bodies() if isinstance(b, WorkerStatusChanged)]
            assert [c.new_status for c in changes] == [S.READY] * 3
            assert {r.status for r in await kv_records(reg.service.store.kv)} == {S.READY}
    finally:
        for heartbeat in beats:
            heartbeat.stop()
        await bus.close()


def count_expiry_ticks(reg: Running[Registry]) -> list[float]:
    """Wrap the registry's expiry check (its loop looks it up each tick); log when each ran."""
    ticks: list[float] = []
    expire = reg.service.expire

    async def counted(ttl_s: float) -> None:
        await expire(ttl_s)
        ticks.append(reg.service.clock())

    reg.service.expire = counted  # type: ignore[method-assign]
    return ticks


async def watch_not_ready(reg: Running[Registry], seen: list[tuple[str, WorkerStatus]]) -> None:
    """Record every worker the registry holds as anything but Ready, until cancelled."""
    while True:
        records = reg.service.book.records.values()
        seen.extend((r.id, r.status) for r in records if r.status != S.READY)
        await asyncio.sleep(0.01)
