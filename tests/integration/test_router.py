"""Router with a real registry, capacity service and sim workers: choice, backpressure, retries,
mid-stream failure, the official client, error envelopes and gateway admission."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from types import SimpleNamespace
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from prometheus_client import CollectorRegistry

from schemas.registry import WorkerStatus
from services.cli.supervisor import wait_routers_heard
from services.common.bus import Bus
from tests.helpers import assert_error_envelope, eventually, free_port, post
from tests.integration.fleet_fixtures import (
    Claims,
    fleet,
    running_capacity,
    running_router,
    spawn_worker,
)
from tests.integration.registry_fixtures import running_registry

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
WORKER_DONE = 'switchboard_worker_request_duration_seconds_count{model="sim-model"}'


def body(max_tokens: int = 4, stream: bool = False, model: str = "sim-model") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def served(s: aiohttp.ClientSession, worker: Any) -> float:
    """Requests the worker has finished (its own count: a non-streamed one is counted before
    its response is sent)."""
    async with s.get(worker.url + "/metrics") as resp:
        text = await resp.text()
    found = [line for line in text.splitlines() if line.startswith(WORKER_DONE + " ")]
    return float(found[0].split()[-1]) if found else 0.0


def router_sample(router: Any, name: str, **labels: str) -> float | None:
    """A value from the router's own Prometheus registry."""
    registry: CollectorRegistry = router.service.metrics.prometheus
    return registry.get_sample_value(name, labels)


async def test_routes_to_the_idle_replica_and_follows_load(
    bus: Bus, nats_url: str, prefix: str
) -> None:
    slow = {"sim_tokens_per_s": 20.0, "max_in_flight": 4}
    async with (
        fleet(nats_url, prefix, [slow, slow]) as (router, (a, b)),
        aiohttp.ClientSession() as s,
    ):
        view = router.service.view
        hogs = [asyncio.create_task(post(s, a.url + CHAT, body(max_tokens=40))) for _ in range(3)]
        await eventually(lambda: view.score(a.service.worker_id, "sim-model") == 3)
        for _ in range(2):  # each goes to b: a is visibly busier
            status, _data, headers = await post(s, router.url + CHAT, body())
            assert status == 200
            assert headers["x-switchboard-origin"] == "worker"
        assert await served(s, b) == 2  # b had nothing else to do
        a_gate = a.service.models["sim-model"].gate
        # b busier than a will be: long enough to still run when the next request is chosen
        b_hogs = [
            asyncio.create_task(post(s, b.url + CHAT, body(max_tokens=200))) for _ in range(4)
        ]
        await eventually(lambda: view.score(b.service.worker_id, "sim-model") >= 4)
        await eventually(lambda: a_gate.core.in_flight == 0, timeout_s=5)  # a's hogs finished
        await eventually(lambda: view.score(a.service.worker_id, "sim-model") == 0)
        before = (await served(s, a), await served(s, b))
        status, _, _ = await post(s, router.url + CHAT, body())
        assert status == 200
        assert (await served(s, a), await served(s, b)) == (before[0] + 1, before[1])  # the flip
        await asyncio.gather(*hogs)
        for hog in b_hogs:
            hog.cancel()
        await asyncio.gather(*b_hogs, return_exceptions=True)


async def test_saturated_worker_backpressure_reaches_the_client_intact(
    bus: Bus, nats_url: str, prefix: str
) -> None:
    tight = {"sim_tokens_per_s": 10.0, "max_in_flight": 1, "max_queue_depth": 0}
    async with fleet(nats_url, prefix, [tight]) as (router, (w,)), aiohttp.ClientSession() as s:
        hog = asyncio.create_task(post(s, w.url + CHAT, body(max_tokens=30)))
        await eventually(lambda: w.service.models["sim-model"].gate.core.in_flight == 1)
        # Heartbeat lag, made explicit: the router is told the worker is idle while it is not
        # (knowing it full, the router would hold the request until the worker has room).
        await Claims(bus, prefix, w, router).load(in_flight=0)
        direct = await post(s, w.url + CHAT, body())
        relayed = await post(s, router.url + CHAT, body())
        assert relayed[0] == direct[0] == 503
        assert relayed[2]["Retry-After"] == direct[2]["Retry-After"]
        assert relayed[2]["x-switchboard-origin"] == "worker"
        assert relayed[1]["error"]["type"] == "service_unavailable_error"
        assert relayed[1]["error"]["code"] == "rate_limit_exceeded"
        assert relayed[1]["error"]["message"] == direct[1]["error"]["message"]
        assert router_sample(router, "switchboard_router_backpressure_total", origin="worker") == 1
        requests = "switchboard_router_requests_total"
        assert router_sample(router, requests, model="sim-model", outcome="busy") == 1
        await hog


async def test_refused_request_is_retried_on_a_replica_with_room(
    bus: Bus, nats_url: str, prefix: str
) -> None:
    tight = {"sim_tokens_per_s": 10.0, "max_in_flight": 1, "max_queue_depth": 0}
    async with (
        # least_busy: ties go to the smallest id, so the test knows which replica is tried first
        fleet(nats_url, prefix, [tight, tight], policy="least_busy") as (router, ws),
        aiohttp.ClientSession() as s,
    ):
        first = min(ws, key=lambda w: w.service.worker_id)  # the tie-break favourite
        other = max(ws, key=lambda w: w.service.worker_id)
        hog = asyncio.create_task(post(s, first.url + CHAT, body(max_tokens=30)))
        await eventually(lambda: first.service.models["sim-model"].gate.core.in_flight == 1)
        # Heartbeat lag, made explicit: the router is told `first` is idle while it is not.
        await Claims(bus, prefix, first, router).load(in_flight=0)
        status, _data, _headers = await post(s, router.url + CHAT, body())
        assert status == 200
        assert other.service.models["sim-model"].engine.peak_running == 1
        assert (
            router_sample(router, "switchboard_router_upstream_retries_total", reason="busy") == 1
        )
        await hog


async def test_official_client_and_error_envelopes(nats_url: str, prefix: str) -> None:
    async with fleet(nats_url, prefix, [{}], api_keys=("k-1", "k-2"), request_body_limit=4096) as (
        router,
        _,
    ):
        client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="k-2", max_retries=0)
        full = await client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "x"}], max_tokens=5
        )
        assert full.usage is not None
        assert full.usage.completion_tokens == 5
        text = ""
        async for chunk in await client.chat.completions.create(
            model="sim-model",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=5,
            stream=True,
        ):
            text += "".join(c.delta.content or "" for c in chunk.choices)
        assert text == full.choices[0].message.content
        assert [m.id for m in (await client.models.list()).data] == ["sim-model"]
        await client.close()
        async with aiohttp.ClientSession() as s:
            auth = {"Authorization": "Bearer k-1"}
            cases = [
                (body(), {}, 401, "invalid_api_key"),
                (body(), {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
                (body(model="ghost"), auth, 404, "model_not_found"),
                (b"x" * 5000, auth, 413, "request_too_large"),
                (b"{bad json", auth, 400, "invalid_json"),
                (b'{"messages": []}', auth, 400, "invalid_value"),
            ]
            for payload, headers, status, code in cases:
                got, data, resp_headers = await post(s, router.url + CHAT, payload, headers=headers)
                assert (got, data["error"]["code"]) == (status, code), data
                assert set(data["error"]) == {"message", "type", "code", "param"}
                assert resp_headers["x-switchboard-origin"] == "router"
            # the worker's refusal of a feature no engine has reaches the client intact
            asks = {**body(), "audio": {"voice": "alloy", "format": "wav"}}
            got, data, resp_headers = await post(s, router.url + CHAT, asks, headers=auth)
            assert (got, data["error"]["param"]) == (400, "audio"), data
            assert data["error"]["code"] == "unsupported_parameter"
            assert resp_headers["x-switchboard-origin"] == "worker"


async def test_gateway_queue_and_its_503_when_capacity_is_exhausted(
    nats_url: str, prefix: str
) -> None:
    slow = {"sim_tokens_per_s": 10.0}
    async with (
        fleet(
            nats_url,
            prefix,
            [slow],
            capacity={"override": 1},
            gateway_queue_depth=1,
            gateway_max_wait_s=0.5,
        ) as (router, _),
        aiohttp.ClientSession() as s,
    ):
        await eventually(lambda: router.service.gateway.limit_for("sim-model") == 1)
        running = asyncio.create_task(post(s, router.url + CHAT, body(max_tokens=20)))
        gate = router.service.gateway.gate("sim-model")
        await eventually(lambda: gate.core.in_flight == 1)
        queued = asyncio.create_task(post(s, router.url + CHAT, body()))
        await eventually(lambda: gate.core.queue_depth == 1)
        full = await post(s, router.url + CHAT, body())
        assert full[0] == 503
        assert full[2]["x-switchboard-origin"] == "router"
        assert full[1]["error"]["type"] == "service_unavailable_error"
        assert "queue is full" in full[1]["error"]["message"]
        timed_out = await queued
        assert timed_out[0] == 503
        assert "no slot freed in time" in timed_out[1]["error"]["message"]
        assert int(timed_out[2]["Retry-After"]) >= 1
        assert (await running)[0] == 200
        assert router_sample(router, "switchboard_router_backpressure_total", origin="router") == 2


async def test_no_replica_pending_is_503_and_models_lists_only_ready(
    nats_url: str, prefix: str
) -> None:
    async with (
        fleet(nats_url, prefix, [{"models": ("a", "b")}]) as (router, (w,)),
        aiohttp.ClientSession() as s,
    ):
        async with s.get(router.url + "/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["a", "b"]
        # a rolling update: the only replica is starting again
        record = router.service.view.records[w.service.worker_id]
        router.service.view.records[w.service.worker_id] = msgspec.structs.replace(
            record, status=WorkerStatus.PENDING
        )
        status, data, headers = await post(s, router.url + CHAT, body(model="a"))
        assert (status, data["error"]["code"], headers["Retry-After"]) == (
            503,
            "no_replica_available",
            "2",
        )


async def test_worker_killed_mid_stream(bus: Bus, nats_url: str, prefix: str) -> None:
    ports = [free_port(), free_port()]
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running_registry(nats_url, prefix, heartbeat_ttl_s=1.5))
        await stack.enter_async_context(running_capacity(nats_url, prefix))
        procs = []
        for port in ports:
            procs.append(
                await spawn_worker(
                    nats_url,
                    prefix,
                    port,
                    "--sim-tokens-per-s",
                    "20",
                    "--heartbeat-interval-s",
                    "0.3",
                )
            )
        try:
            router = await stack.enter_async_context(running_router(nats_url, prefix))
            await eventually(
                lambda: (
                    sum(
                        r.status == WorkerStatus.READY for r in router.service.view.records.values()
                    )
                    == 2
                    and router.service.view.stale_count(router.service.clock()) == 0
                ),
                timeout_s=20,
            )
            async with aiohttp.ClientSession() as s:
                begun: list[bytes] = []

                async def stream() -> tuple[str, float]:
                    async with s.post(
                        router.url + CHAT, json=body(max_tokens=60, stream=True)
                    ) as resp:
                        assert resp.status == 200
                        last = b""
                        async for line in resp.content:
                            if line.strip():
                                if not last:
                                    begun.append(line)
                                last = line.strip()
                        return last.decode(), time.monotonic()

                streams = [asyncio.create_task(stream()) for _ in range(4)]
                # every stream under way (a first chunk seen) before one worker dies
                await eventually(lambda: len(begun) == 4)
                killed_at = time.monotonic()
                procs[0].send_signal(signal.SIGKILL)
                results = await asyncio.wait_for(asyncio.gather(*streams), 10)
                errored = [t for last, t in results if '"error"' in last]
                done = [last for last, _ in results if last == "data: [DONE]"]
                assert len(errored) == 2, results  # the dead worker's two streams
                assert len(done) == 2  # the other worker's streams are unaffected
                assert all(t - killed_at < 2.0 for t in errored)
                for _ in range(4):  # new requests avoid the dead worker
                    status, _, _ = await post(s, router.url + CHAT, body())
                    assert status == 200
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                await proc.wait()


async def test_health_is_200_once_the_fleet_is_known_and_503_when_draining(
    nats_url: str, prefix: str
) -> None:
    async with (
        fleet(nats_url, prefix, [{}], api_keys=("k",)) as (router, _),
        aiohttp.ClientSession() as s,
    ):
        async with s.get(router.url + "/health") as resp:  # probes carry no API key
            assert resp.status == 200
            assert await resp.json() == {
                "status": "ok",
                "workers": 1,
                "ready_workers": 1,
                "ready_without_heartbeat": 0,  # what `up` waits for before "stack is up"
            }
        router.service.drain()
        async with s.get(router.url + "/health") as resp:
            assert resp.status == 503
            assert (await resp.json())["status"] == "draining"
        async with s.get(router.url + "/v1/chat/completions") as resp:  # 405, in the envelope
            assert resp.status == 405
            assert_error_envelope(await resp.json(), "method_not_allowed")


async def test_up_waits_until_the_router_has_heard_from_every_ready_worker(
    nats_url: str, prefix: str
) -> None:
    async with fleet(nats_url, prefix, [{}]) as (router, _):

        def child(role: str, url: str | None = None) -> Any:
            """What wait_routers_heard reads of a child: its role, health URL and process."""
            spec = SimpleNamespace(role=role, health_url=url)
            return SimpleNamespace(
                spec=spec, proc=SimpleNamespace(pid=os.getpid(), returncode=None)
            )

        lines: list[str] = []
        ours = child("router", router.url + "/healthz")  # in-process: the router's pid is ours
        heard = await wait_routers_heard(
            [child("worker"), ours], 5.0, lambda _, line: lines.append(line), poll_s=0.01
        )
        assert (heard, lines) == (True, [])
        # a second running worker the router does not see Ready: a bounded wait, then a note
        began = time.monotonic()
        heard = await wait_routers_heard(
            [child("worker"), child("worker"), ours],
            0.3,
            lambda _, line: lines.append(line),
            poll_s=0.01,
        )
        assert not heard
        assert time.monotonic() - began < 3.0
        assert lines == [
            "note: after 0.3s a router still misses workers (1 Ready of 2 running, 0 without a "
            "heartbeat); going on"
        ]
