"""How the router relays a worker's answer: a whole JSON answer as one response with its
Content-Length and the worker's content type; a stream chunk by chunk as the worker sends it, its
slot freed when the client leaves mid-stream. The worker is a scripted aiohttp server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from schemas.registry import SetStatusRequest, UpsertRequest, WorkerSpec, WorkerStatus
from schemas.subjects import Subjects
from services.common.bus import Bus
from services.registry.client import RegistryClient
from services.registry.index import HEARTBEAT_LABEL
from tests.helpers import eventually
from tests.integration.fleet_fixtures import running_capacity, running_router
from tests.integration.registry_fixtures import running_registry

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
# Not what the router would write itself: it must come from the worker.
JSON_TYPE = "application/json; charset=utf-8; profile=scripted"
ANSWER = b'{"id":"x","object":"chat.completion","choices":[]}'
EVENT = b'data: {"n": %d}\n\n'


class Scripted:
    """A worker whose stream sends its next event only when the test says so."""

    def __init__(self) -> None:
        self.next_event: asyncio.Queue[None] = asyncio.Queue()
        self.streams_ended = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            return web.Response(body=ANSWER, headers={"Content-Type": JSON_TYPE})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for n in range(3):
                await self.next_event.get()
                await resp.write(EVENT % n)
            await resp.write_eof()
        finally:
            self.streams_ended += 1
        return resp


@contextlib.asynccontextmanager
async def scripted_fleet(
    bus: Bus, nats_url: str, prefix: str, **router_cfg: Any
) -> AsyncIterator[Any]:
    """Registry, capacity, a router, and the scripted worker registered by hand (Ready, no
    heartbeats, as an operator registers an external server)."""
    worker = Scripted()
    app = web.Application()
    app.router.add_post(CHAT, worker.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with (
            running_registry(nats_url, prefix),
            running_capacity(nats_url, prefix),
            running_router(nats_url, prefix, **router_cfg) as router,
        ):
            client = RegistryClient(bus, Subjects.for_prefix(prefix))
            spec = WorkerSpec(
                url=f"http://127.0.0.1:{port}", models=("m",), labels={HEARTBEAT_LABEL: "off"}
            )
            reply = await client.call(UpsertRequest(worker=spec))
            await client.call(SetStatusRequest(id=reply.worker.id, status=WorkerStatus.READY))  # type: ignore[union-attr]
            await eventually(lambda: "m" in router.service.view.models())
            yield router, worker
    finally:
        for _ in range(3):  # a stream still waiting for its events finds its client gone
            worker.next_event.put_nowait(None)
        await runner.cleanup()


def requests_ok(router: Any) -> float | None:
    registry: CollectorRegistry = router.service.metrics.prometheus
    labels = {"model": "m", "outcome": "ok"}
    return registry.get_sample_value("switchboard_router_requests_total", labels)


async def test_a_whole_answer_is_one_response_with_its_length_and_the_workers_type(
    bus: Bus, nats_url: str, prefix: str
) -> None:
    async with scripted_fleet(bus, nats_url, prefix) as (router, _), aiohttp.ClientSession() as s:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with s.post(router.url + CHAT, json=body) as resp:
            assert resp.status == 200
            assert await resp.read() == ANSWER
            assert resp.headers["Content-Length"] == str(len(ANSWER))
            assert "Transfer-Encoding" not in resp.headers
            assert resp.headers["Content-Type"] == JSON_TYPE
            assert resp.headers["x-switchboard-origin"] == "worker"
            assert "Cache-Control" not in resp.headers  # SSE's headers are for streams
        await eventually(lambda: requests_ok(router) == 1)


async def test_a_stream_is_relayed_as_it_comes_and_freed_when_the_client_leaves(
    bus: Bus, nats_url: str, prefix: str
) -> None:
    async with scripted_fleet(bus, nats_url, prefix) as (router, worker):
        gate = router.service.gateway.gate("m")
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with aiohttp.ClientSession() as s, s.post(router.url + CHAT, json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert resp.headers["Cache-Control"] == "no-cache"
            for n in range(2):  # each event reaches the client before the worker sends the next
                worker.next_event.put_nowait(None)
                # bounded only so a router that holds events back fails here, not at the timeout
                event = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 30)
                assert event == EVENT % n
            assert gate.core.in_flight == 1
        # the client left mid-stream: the router ends the relay, frees its slot, and closes the
        # worker's connection (the worker's next write fails)
        await eventually(lambda: gate.core.in_flight == 0)
        worker.next_event.put_nowait(None)
        await eventually(lambda: worker.streams_ended == 1)
        await eventually(lambda: requests_ok(router) == 1)


async def test_a_worker_silent_mid_stream_ends_it_with_an_error_event(
    bus: Bus, nats_url: str, prefix: str
) -> None:
    silence = {"body_read_timeout_s": 0.3}
    async with scripted_fleet(bus, nats_url, prefix, **silence) as (router, worker):
        gate = router.service.gateway.gate("m")
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with aiohttp.ClientSession() as s, s.post(router.url + CHAT, json=body) as resp:
            worker.next_event.put_nowait(None)  # one event, then nothing
            rest = await asyncio.wait_for(resp.read(), 30)
        assert rest.startswith(EVENT % 0)
        assert b'"code":"upstream_failed"' in rest
        assert rest.endswith(b"\n\n")
        await eventually(lambda: gate.core.in_flight == 0)
        registry: CollectorRegistry = router.service.metrics.prometheus
        failed = {"model": "m", "outcome": "http_502"}
        assert registry.get_sample_value("switchboard_router_requests_total", failed) == 1
