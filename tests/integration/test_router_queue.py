"""The router's gateway queue: clients that leave while queued, and the per-key priority cap."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from services.admission.gate import Gate
from tests.helpers import eventually, post, queue_and_leave
from tests.integration.fleet_fixtures import fleet

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
WORKER_DONE = 'switchboard_worker_request_duration_seconds_count{model="sim-model"}'


def body(max_tokens: int = 4, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


@contextlib.asynccontextmanager
async def one_slot_fleet(nats_url: str, prefix: str, **router: Any) -> AsyncIterator[Any]:
    """One sim worker, gateway capacity 1, a long queue wait (a freed place cannot be a timeout)."""
    async with fleet(
        nats_url,
        prefix,
        [{"sim_tokens_per_s": 20.0}],
        capacity={"override": 1},
        gateway_queue_depth=32,
        gateway_max_wait_s=60.0,
        **router,
    ) as (r, ws):
        await eventually(lambda: r.service.gateway.limit_for("sim-model") == 1)
        yield r, ws


@contextlib.asynccontextmanager
async def hog(url: str, gate: Gate, **kw: Any) -> AsyncIterator[None]:
    """Holds the fleet's one slot (a long stream, running on the worker) until the block ends."""
    async with aiohttp.ClientSession() as s, s.post(url + CHAT, json=body(2000, True), **kw) as r:
        assert r.status == 200
        await r.content.readany()
        assert gate.core.in_flight == 1
        yield
    # leaving the block closed the hog's connection: the router ends the stream and frees the slot


async def worker_done(s: aiohttp.ClientSession, worker_url: str) -> str:
    async with s.get(worker_url + "/metrics") as resp:
        text = await resp.text()
    return next(line for line in text.splitlines() if line.startswith(WORKER_DONE))


async def test_clients_leaving_the_queue_free_it_at_once_and_never_reach_a_worker(
    nats_url: str, prefix: str
) -> None:
    async with one_slot_fleet(nats_url, prefix) as (router, (w,)), aiohttp.ClientSession() as s:
        gate = router.service.gateway.gate("sim-model")
        async with hog(router.url, gate):
            await queue_and_leave(router.url + CHAT, body(), 20, lambda: gate.core.queue_depth)
            # well inside the 60 s queue wait: only the disconnects can have freed the places
            await eventually(lambda: gate.core.queue_depth == 0, timeout_s=2)
            assert gate.core.in_flight == 1  # the hog; nobody was admitted in the leavers' place
            registry: CollectorRegistry = router.service.metrics.prometheus
            gone = {"model": "sim-model", "outcome": "http_499"}
            assert registry.get_sample_value("switchboard_router_requests_total", gone) == 20
        status, _, _ = await post(s, router.url + CHAT, body())
        assert status == 200
        await eventually(lambda: w.service.models["sim-model"].gate.idle.is_set())
        # the worker ran the hog and the later request, none of the 20 that left
        assert await worker_done(s, w.url) == f"{WORKER_DONE} 2.0"
        assert (gate.core.in_flight, gate.core.queue_depth) == (0, 0)


async def test_priority_is_capped_per_api_key(nats_url: str, prefix: str) -> None:
    caps = {"api_keys": ("k-plain", "k-vip"), "max_priority": 1, "key_max_priority": {"k-vip": 9}}
    async with (
        one_slot_fleet(nats_url, prefix, **caps) as (router, _),
        aiohttp.ClientSession() as s,
    ):
        gate = router.service.gateway.gate("sim-model")
        asks = [("k-plain", "9"), ("k-vip", "9"), ("k-vip", "5"), ("k-plain", "-3")]
        async with hog(router.url, gate, headers={"Authorization": "Bearer k-plain"}):
            waiting = [
                asyncio.create_task(
                    post(
                        s,
                        router.url + CHAT,
                        body(),
                        headers={"Authorization": f"Bearer {key}", "x-switchboard-priority": ask},
                    )
                )
                for key, ask in asks
            ]
            await eventually(lambda: gate.core.queue_depth == len(asks))
            # clamped to the key's cap; asking for less than the cap is always allowed
            assert sorted(p for p, _ in gate.core.queue.values()) == [-3, 1, 5, 9]
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
