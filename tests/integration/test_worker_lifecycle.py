"""Worker lifecycle against a real registry: Ready, heartbeats, SIGTERM drain, re-registration."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp
import pytest

from schemas import codec
from schemas.base import Envelope
from schemas.load import WorkerLoad
from schemas.registry import (
    CommandError,
    CommandOk,
    GetRequest,
    RemoveRequest,
    WorkerRegistered,
    WorkerRemoved,
    WorkerStatus,
    WorkerStatusChanged,
)
from schemas.subjects import Subjects
from services.common.bus import Bus, Message
from services.common.errors import BUSY_REASONS
from services.registry.client import RegistryClient
from tests.helpers import eventually, free_port
from tests.integration.fleet_fixtures import running_worker, spawn_worker
from tests.integration.registry_fixtures import record_events, running_registry, start_registry

pytestmark = pytest.mark.integration
S = WorkerStatus
# The record is read back every 0.1 s, and a registry that is gone answers nothing within 0.5 s
# (the defaults, 2 s and 5 s, would make these tests wait on the clock).
QUICK = {"registry_check_interval_s": 0.1, "registry_timeout_s": 0.5}


class LoadLog:
    def __init__(self) -> None:
        self.loads: list[tuple[float, Envelope[WorkerLoad]]] = []

    async def on_msg(self, msg: Message) -> None:
        self.loads.append((time.monotonic(), codec.load_decoder.decode(msg.data)))


async def test_ready_heartbeats_and_load(bus: Bus, prefix: str, nats_url: str) -> None:
    events = await record_events(bus, prefix)
    loads = LoadLog()
    await bus.subscribe(Subjects.for_prefix(prefix).load_all, cb=loads.on_msg)
    async with (
        running_registry(nats_url, prefix),
        running_worker(
            nats_url, prefix, heartbeat_interval_s=0.25, max_in_flight=3, sim_tokens_per_s=20.0
        ) as w,
        aiohttp.ClientSession() as s,
    ):
        await eventually(
            lambda: [type(b) for b in events.bodies()] == [WorkerRegistered, WorkerStatusChanged]
        )
        registered, ready = events.bodies()
        assert isinstance(registered, WorkerRegistered)
        assert registered.worker.status == S.PENDING
        assert registered.worker.max_running_requests == 3  # the engine's real limit, reported
        assert registered.worker.model_slots == {"sim-model": 3}  # and per model
        assert isinstance(ready, WorkerStatusChanged)
        assert (ready.old_status, ready.new_status) == (S.PENDING, S.READY)
        # idle heartbeats at the configured rate: 4 of them span ~3 intervals (0.75 s), neither
        # a burst nor a stall; slack for a loaded box
        loads.loads.clear()
        await eventually(lambda: len(loads.loads) >= 4)
        idle = [env for _, env in loads.loads[:4]]
        span = loads.loads[3][0] - loads.loads[0][0]
        assert 0.4 <= span <= 1.5, span
        assert all(env.body.models[0].in_flight == 0 for env in idle)
        assert [e.seq for e in idle] == list(range(idle[0].seq, idle[0].seq + len(idle)))
        # load shows up promptly (debounced publish on change), then drains back to 0
        body = {
            "model": "sim-model",
            # 80 words: past core.MIN_PREFILL_SAMPLE, so each request is a prefill-rate sample
            "messages": [{"role": "user", "content": "word " * 80}],
            "max_tokens": 10,  # 0.5 s each: long enough to be seen running and queued
        }
        reqs = [
            asyncio.create_task(s.post(w.url + "/v1/chat/completions", json=body)) for _ in range(5)
        ]
        await eventually(
            lambda: any(
                env.body.models[0].in_flight == 3 and env.body.models[0].queue_depth == 2
                for _, env in loads.loads
            ),
            timeout_s=2,
        )
        for resp in await asyncio.gather(*reqs):
            assert resp.status == 200
            resp.release()
        await eventually(lambda: loads.loads[-1][1].body.models[0].in_flight == 0)
        # the heartbeat that says they finished carries what they measured: each held its slot
        # for at least 9 steps of 1/20 s, and prefilled its prompt at some rate; no prefix cache
        done = loads.loads[-1][1].body.models[0]
        assert done.service_s is not None
        assert 0.4 < done.service_s < 5
        assert done.prefill_tokens_per_s is not None
        assert done.prefill_tokens_per_s > 0
        assert (done.prefix_lookups, done.prefix_hits) == (0, 0)


async def test_registry_losing_our_record_gets_it_back(
    bus: Bus, prefix: str, nats_url: str
) -> None:
    client = RegistryClient(bus, Subjects.for_prefix(prefix))
    async with (
        running_registry(nats_url, prefix),
        running_worker(nats_url, prefix, **QUICK) as w,
    ):
        await eventually(lambda: w.service.worker_id is not None)
        assert isinstance(await client.call(RemoveRequest(id=w.service.worker_id)), CommandOk)

        async def back_and_ready() -> bool:
            snap = await client.snapshot()
            return any(r.url == w.url and r.status == S.READY for r in snap.workers)

        await eventually(back_and_ready)


async def test_registry_restart_keeps_the_worker(bus: Bus, prefix: str, nats_url: str) -> None:
    client = RegistryClient(bus, Subjects.for_prefix(prefix))
    _, stop_first = await start_registry(nats_url, prefix)
    async with running_worker(nats_url, prefix, **QUICK) as w:
        await stop_first()
        async with running_registry(nats_url, prefix):

            async def ready() -> bool:
                reply = await client.call(GetRequest(id=w.service.worker_id))
                worker = reply.worker if isinstance(reply, CommandOk) else None
                return worker is not None and worker.status == S.READY

            await eventually(ready)


async def test_sigterm_drains_then_deregisters(bus: Bus, prefix: str, nats_url: str) -> None:
    events = await record_events(bus, prefix)
    port = free_port()
    async with running_registry(nats_url, prefix):
        proc = await spawn_worker(
            nats_url,
            prefix,
            port,
            "--sim-tokens-per-s",
            "20",
            "--max-in-flight",
            "2",
            "--max-queue-depth",
            "4",
        )
        url = f"http://127.0.0.1:{port}"
        try:
            await eventually(
                lambda: any(
                    isinstance(b, WorkerStatusChanged) and b.new_status == S.READY
                    for b in events.bodies()
                ),
                timeout_s=20,
            )
            async with aiohttp.ClientSession() as s:
                body: dict[str, Any] = {
                    "model": "sim-model",
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 20,
                }
                inflight = [
                    asyncio.create_task(s.post(url + "/v1/chat/completions", json=body))
                    for _ in range(2)
                ]

                async def both_running() -> bool:
                    async with s.get(url + "/health") as resp:
                        return bool((await resp.json())["models"][0]["in_flight"] == 2)

                await eventually(both_running)
                proc.send_signal(signal.SIGTERM)
                await eventually(
                    lambda: any(
                        isinstance(b, WorkerStatusChanged) and b.new_status == S.DRAINING
                        for b in events.bodies()
                    ),
                    timeout_s=5,
                )
                async with s.post(url + "/v1/chat/completions", json=body) as late:
                    assert late.status == 503
                    refused = (await late.json())["error"]
                    assert refused["code"] == "rate_limit_exceeded"
                    assert BUSY_REASONS["draining"] in refused["message"]
                for resp in await asyncio.gather(*inflight):
                    assert resp.status == 200  # in-flight requests complete
                    data = await resp.json()
                    assert data["usage"]["completion_tokens"] == 20
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
        await eventually(lambda: isinstance(events.bodies()[-1], WorkerRemoved))
        removed = events.bodies()[-1]
        assert isinstance(removed, WorkerRemoved)
        assert removed.reason == "drained"
        reply = await RegistryClient(bus, Subjects.for_prefix(prefix)).call(
            GetRequest(id=removed.worker.id)
        )
        assert isinstance(reply, CommandError)
