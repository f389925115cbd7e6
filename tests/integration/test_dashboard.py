"""The router's live fleet page: its SSE feed, its auth, and the page in headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from schemas import codec
from schemas.dashboard import FleetDelta, FleetSnapshot
from schemas.registry import CommandOk, SetStatusRequest, WorkerStatus, WorkerStatusChanged
from schemas.subjects import Subjects
from services.common.bus import Bus
from services.registry.client import RegistryClient
from tests.browser import MISSING, chromium_page, find_chromium
from tests.helpers import eventually, free_port
from tests.integration.fleet_fixtures import fleet, running_router, spawn_worker
from tests.integration.registry_fixtures import record_events, running_registry

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def one_worker_fleet(
    nats_url: str, prefix: str, **router: Any
) -> AsyncIterator[tuple[Any, Any]]:
    """Registry (1 s heartbeat TTL), capacity, one in-process sim worker and a router."""
    registry = {"heartbeat_ttl_s": 1.0, "beacon_interval_s": 0.3}
    worker = {"max_in_flight": 3, "models": ("sim-model",)}
    async with fleet(nats_url, prefix, [worker], registry=registry, **router) as (r, (w,)):
        yield r, w


class Feed:
    """Reads /dashboard/events: keeps every message, and the fleet as a viewer holds it (the
    first snapshot with every delta applied since)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.snapshots: list[FleetSnapshot] = []
        self.deltas: list[FleetDelta] = []
        self.held: FleetSnapshot | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        event = ""
        async for raw in self.resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event == "fleet":
                snapshot = codec.decode(line[len("data: ") :].encode(), FleetSnapshot)
                self.snapshots.append(snapshot)
                self.held = snapshot
            elif line.startswith("data: ") and event == "delta":
                delta = codec.decode(line[len("data: ") :].encode(), FleetDelta)
                self.deltas.append(delta)
                self.held = applied(self.held, delta)

    @property
    def last(self) -> FleetSnapshot | None:
        return self.held

    def status_of(self, worker_id: str) -> WorkerStatus | None:
        last = self.last
        found = None if last is None else next((w for w in last.workers if w.id == worker_id), None)
        return None if found is None else found.status


def applied(held: FleetSnapshot | None, delta: FleetDelta) -> FleetSnapshot:
    """What the page does with a delta."""
    assert held is not None, "a delta before the first snapshot"
    rows = {w.id: w for w in held.workers if w.id not in delta.removed}
    rows.update((w.id, w) for w in delta.workers)
    return msgspec.structs.replace(
        held,
        workers=tuple(rows[w] for w in sorted(rows)),
        capacity=held.capacity if delta.capacity is None else delta.capacity,
        gateway={**held.gateway, **delta.gateway},
        registry_epoch=delta.registry_epoch,
        registry_seq=delta.registry_seq,
    )


async def test_feed_streams_the_fleet_and_follows_a_status_change(
    nats_url: str, prefix: str, bus: Bus
) -> None:
    async with (
        one_worker_fleet(nats_url, prefix) as (router, worker),
        aiohttp.ClientSession() as s,
        s.get(router.url + "/dashboard/events") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        feed = Feed(resp)

        def ready_with_capacity() -> bool:
            last = feed.last
            return (
                feed.status_of(worker.service.worker_id) == WorkerStatus.READY
                and last is not None
                and last.capacity is not None
                and last.capacity.models.get("sim-model") is not None
                and last.capacity.models["sim-model"].capacity == 3
                and bool(last.workers[0].load)
                and last.workers[0].fresh
            )

        await eventually(ready_with_capacity, timeout_s=10)
        last = feed.last
        assert last is not None
        assert last.capacity is not None
        assert last.capacity.models["sim-model"].source.value == "worker_reported"
        assert last.workers[0].load[0].max_in_flight == 3
        assert last.registry_seq > 0

        # A request through the router shows up as this router's gateway load for the model.
        body = {
            "model": "sim-model",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 4,
        }
        async with s.post(router.url + "/v1/chat/completions", json=body) as reply:
            assert reply.status == 200
        await eventually(lambda: "sim-model" in (feed.last.gateway if feed.last else {}))
        assert feed.last is not None
        assert feed.last.gateway["sim-model"].limit == 3

        done = await RegistryClient(bus, Subjects.for_prefix(prefix)).call(
            SetStatusRequest(
                id=worker.service.worker_id, status=WorkerStatus.DRAINING, reason="test"
            )
        )
        assert isinstance(done, CommandOk), done
        await eventually(lambda: feed.status_of(worker.service.worker_id) == WorkerStatus.DRAINING)
        feed.task.cancel()


async def heartbeats_go_by(router: Any, worker_id: str, count: int = 5) -> None:
    """Until the router has taken `count` more heartbeats from the worker (0.2 s apart)."""
    view = router.service.view
    since = view.beats[worker_id].seq
    await eventually(lambda: view.beats[worker_id].seq >= since + count)


async def test_after_the_first_message_a_change_sends_only_the_worker_that_changed(
    nats_url: str, prefix: str, bus: Bus
) -> None:
    worker = {"max_in_flight": 2, "models": ("sim-model",)}
    async with (
        fleet(nats_url, prefix, [worker, worker]) as (router, (a, b)),
        aiohttp.ClientSession() as s,
        s.get(router.url + "/dashboard/events") as resp,
    ):
        feed = Feed(resp)
        await eventually(lambda: len(feed.snapshots) == 1)
        first = feed.snapshots[0]
        assert {w.id for w in first.workers} == {a.service.worker_id, b.service.worker_id}
        assert all(w.fresh and w.load for w in first.workers)
        await heartbeats_go_by(router, a.service.worker_id)  # the feed ticks meanwhile

        done = await RegistryClient(bus, Subjects.for_prefix(prefix)).call(
            SetStatusRequest(id=b.service.worker_id, status=WorkerStatus.DRAINING, reason="test")
        )
        assert isinstance(done, CommandOk), done
        await eventually(lambda: feed.status_of(b.service.worker_id) == WorkerStatus.DRAINING)
        await heartbeats_go_by(router, a.service.worker_id)
        feed.task.cancel()
        # Both workers heartbeat every 0.2 s with the same load meanwhile: that is no news, so
        # the one change is the only row any message after the first carried.
        sent = [w for d in feed.deltas for w in d.workers]
        assert [(w.id, w.status) for w in sent] == [(b.service.worker_id, WorkerStatus.DRAINING)]
        assert all(d.removed == () for d in feed.deltas)
        assert feed.snapshots == [first]


async def test_page_and_feed_need_the_api_key_when_keys_are_set(nats_url: str, prefix: str) -> None:
    async with (
        one_worker_fleet(nats_url, prefix, api_keys=("k1",)) as (router, _),
        aiohttp.ClientSession() as s,
    ):
        for path in ("/dashboard", "/dashboard/events"):
            async with s.get(router.url + path) as resp:
                assert resp.status == 401
                error = (await resp.json())["error"]
                assert error["code"] == "invalid_api_key"
            async with s.get(router.url + path + "?key=wrong") as resp:
                assert resp.status == 401
        async with s.get(router.url + "/dashboard?key=k1") as resp:
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/html")
            assert "default-src 'none'" in resp.headers["content-security-policy"]
            assert "Switchboard fleet" in await resp.text()
        headers = {"Authorization": "Bearer k1"}
        async with s.get(router.url + "/dashboard/events", headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"retry:")


async def test_dashboard_can_be_turned_off(nats_url: str, prefix: str) -> None:
    async with (
        one_worker_fleet(nats_url, prefix, dashboard=False) as (router, _),
        aiohttp.ClientSession() as s,
        s.get(router.url + "/dashboard") as resp,
    ):
        assert resp.status == 404


async def test_open_feed_does_not_hold_up_router_shutdown(nats_url: str, prefix: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running_registry(nats_url, prefix))
        s = await stack.enter_async_context(aiohttp.ClientSession())
        began = 0.0
        async with running_router(nats_url, prefix) as router:
            resp = await s.get(router.url + "/dashboard/events")
            assert resp.status == 200
            await resp.content.readline()
            began = time.monotonic()
        # uvicorn waits up to 30 s for open responses; draining ends the feed instead.
        assert time.monotonic() - began < 10
        assert await resp.content.read() is not None  # the stream ended cleanly
        resp.release()


@pytest.mark.skipif(find_chromium() is None, reason=MISSING)
async def test_page_renders_in_chromium_and_shows_a_dead_worker_within_2s(
    nats_url: str, prefix: str, bus: Bus, tmp_path: Path
) -> None:
    binary = find_chromium()
    assert binary is not None
    events = await record_events(bus, prefix)
    port = free_port()
    proc = None
    async with one_worker_fleet(nats_url, prefix) as (router, worker):
        try:
            proc = await spawn_worker(
                nats_url, prefix, port, "--heartbeat-interval-s", "0.2", "--models", "sim-model"
            )
            url = f"http://127.0.0.1:{port}"
            await eventually(
                lambda: any(
                    r.url == url and r.status == WorkerStatus.READY
                    for r in router.service.view.records.values()
                ),
                timeout_s=20,
            )
            victim = next(r.id for r in router.service.view.records.values() if r.url == url)
            async with chromium_page(binary, tmp_path / "profile") as page:
                await page.goto(router.url + "/dashboard")

                async def row_status(worker_id: str) -> str | None:
                    found = await page.evaluate(
                        f"(document.querySelector('tr[data-worker=\"{worker_id}\"]') || {{}})"
                        ".dataset?.status ?? null"
                    )
                    return None if found is None else str(found)

                async def rendered() -> bool:
                    return (
                        await row_status(worker.service.worker_id) == "ready"
                        and await row_status(victim) == "ready"
                        and await page.evaluate("document.getElementById('conn').textContent")
                        == "live"
                        and await page.evaluate(
                            "document.querySelector('tr[data-model=\"sim-model\"] .tier')"
                            "?.textContent"
                        )
                        == "worker-reported"
                    )

                await eventually(rendered, timeout_s=15)
                assert await page.evaluate("document.getElementById('fleet-capacity').textContent")
                bars = await page.evaluate("document.querySelectorAll('#workers .bar').length")
                assert bars == 2  # one load bar per (worker, model)

                proc.send_signal(signal.SIGKILL)
                await proc.wait()

                def went_not_ready() -> bool:
                    return any(
                        isinstance(b, WorkerStatusChanged)
                        and b.worker_id == victim
                        and b.new_status == WorkerStatus.NOT_READY
                        for b in events.bodies()
                    )

                await eventually(went_not_ready, timeout_s=10)

                # From the registry's NotReady event to the page showing it: within 2 s.
                async def shows_not_ready() -> bool:
                    return await row_status(victim) == "not_ready"

                await eventually(shows_not_ready, timeout_s=2.0)
                assert await row_status(worker.service.worker_id) == "ready"
                assert page.exceptions == []
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
