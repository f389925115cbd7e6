"""The router's gateway queue: clients that leave while queued, the per-key priority cap, TTFT
deadlines (refused at once, a bounded wait, the header's patience) and no holding while a replica
can take a request."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from services.admission.gate import Gate
from services.common.bus import Bus
from tests.helpers import assert_error_envelope, eventually, post, queue_and_leave
from tests.integration.fleet_fixtures import Claims, fleet

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
            assert sorted(w.priority for w in gate.core.queue.values()) == [-3, 1, 5, 9]
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)


TARGET = "x-switchboard-ttft-target-s"
# Far longer than any of these tests may take: a request that waits it out shows the old rule.
LONG_WAIT_S = 60.0


async def timed_post(s: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any, float]:
    began = time.monotonic()
    status, data, _ = await post(s, url + CHAT, body(), **kw)
    return status, data, time.monotonic() - began


def watch_queue(gate: Gate) -> list[int]:
    """The gate's queue depth after every change from now on (it reports each one)."""
    seen = [gate.core.queue_depth]
    reported = gate.on_change

    def changed() -> None:
        seen.append(gate.core.queue_depth)
        reported()

    gate.on_change = changed
    return seen


async def test_a_request_waits_only_while_it_can_meet_its_ttft_target(
    bus: Bus, nats_url: str, prefix: str
) -> None:
    async with (
        fleet(
            nats_url,
            prefix,
            [{"sim_tokens_per_s": 200.0}],
            ttft_target_s=1.0,
            gateway_max_wait_s=LONG_WAIT_S,
            max_ttft_target_s=120.0,
            checkpoint_interval_s=3600.0,  # only the heartbeat below can let the last one go
        ) as (router, (w,)),
        aiohttp.ClientSession() as s,
    ):
        gate = router.service.gateway.gate("sim-model")
        claims = Claims(bus, prefix, w, router)
        # The router is told its one replica's slot is taken, a request holds it 4 s, and its
        # queue has room: the best estimated time to first token is ~4 s.
        await claims.load(in_flight=1, max_in_flight=1, max_queue_depth=4, service_s=4.0)

        # 4 s > the 1 s target: refused at once (though the worker's queue would take it)
        status, data, took = await timed_post(s, router.url)
        assert status == 503, data
        assert_error_envelope(data, "rate_limit_exceeded")
        assert "time-to-first-token target" in data["error"]["message"]
        assert data["error"]["message"].endswith("retry after 4s")  # once ~3 s have drained
        assert took < LONG_WAIT_S / 2
        assert (gate.core.in_flight, gate.core.queue_depth) == (0, 0)

        # Now no queue room either. A 5 s target: it waits here for what is left (~1 s), not
        # for the gateway's 60 s.
        await claims.load(in_flight=1, max_in_flight=1, service_s=4.0)
        waiting = asyncio.create_task(timed_post(s, router.url, headers={TARGET: "5"}))
        await eventually(lambda: gate.core.queue_depth == 1)
        status, data, took = await waiting
        assert status == 503, data
        assert "time-to-first-token target" in data["error"]["message"]
        assert took < LONG_WAIT_S / 2

        # a 100 s target buys the gateway's whole wait: it goes once the replica has room
        waiting = asyncio.create_task(timed_post(s, router.url, headers={TARGET: "100"}))
        await eventually(lambda: gate.core.queue_depth == 1)
        await claims.load(in_flight=0, max_in_flight=1, service_s=4.0)
        status, data, _ = await waiting
        assert status == 200, data
        assert await worker_done(s, w.url) == f"{WORKER_DONE} 1.0"  # only that one reached it

        for bad in ("soon", "0", "-1", "nan", "inf"):
            status, data, headers = await post(s, router.url + CHAT, body(), headers={TARGET: bad})
            assert status == 400, (bad, data)
            assert_error_envelope(data, "invalid_value")
            assert data["error"]["param"] == TARGET
            assert headers["x-switchboard-origin"] == "router"


async def test_no_request_waits_at_the_gateway_while_a_replica_has_a_free_slot(
    bus: Bus, nats_url: str, prefix: str
) -> None:
    """The issue's cause (1): the fleet's capacity (3 slots) is in this router's hands, two of
    them queued inside a slow worker, while the fast worker has free slots."""
    fast = {"sim_tokens_per_s": 200.0, "max_in_flight": 2}
    slow = {"sim_tokens_per_s": 20.0, "max_in_flight": 1, "max_queue_depth": 8}
    async with (
        fleet(nats_url, prefix, [fast, slow], gateway_max_wait_s=LONG_WAIT_S) as (r, (f, sl)),
        aiohttp.ClientSession() as s,
    ):
        gate = r.service.gateway.gate("sim-model")
        await eventually(lambda: r.service.gateway.limit_for("sim-model") == 3)  # the slots
        claims = Claims(bus, prefix, f, r)
        await claims.load(in_flight=2, max_in_flight=2, queue_depth=8, max_queue_depth=8)
        # the fast one looks full: three 2 s requests go to the slow one (1 runs, 2 queue)
        long = [asyncio.create_task(post(s, r.url + CHAT, body(max_tokens=40))) for _ in range(3)]
        slow_gate = sl.service.models["sim-model"].gate
        await eventually(lambda: (slow_gate.core.in_flight, slow_gate.core.queue_depth) == (1, 2))
        assert gate.core.in_flight == 3  # the fleet's capacity, all in this router's hands
        await claims.load(in_flight=0, max_in_flight=2)  # the fast one is free (as it truly is)
        queued = watch_queue(gate)
        quick = [asyncio.create_task(timed_post(s, r.url)) for _ in range(2)]
        done = await asyncio.wait_for(asyncio.gather(*quick), LONG_WAIT_S / 2)
        assert [status for status, _, _ in done] == [200, 200]
        assert max(queued) == 0  # neither waited at the gateway, not even for a moment
        assert await worker_done(s, f.url) == f"{WORKER_DONE} 2.0"  # the fast one took them
        assert [status for status, _, _ in await asyncio.gather(*long)] == [200, 200, 200]
        assert await worker_done(s, sl.url) == f"{WORKER_DONE} 3.0"  # the slow one ran these
