"""The forwarder's gateway admission, as cheap as its outcome allows: a request a fresh replica
can take now asks the fleet view once (no arrival estimate); one that cannot is judged by the
estimate (refused at once, or it waits) without being asked twice; the gateway's gauges are
read when scraped and stay exact."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.responses import Response

from schemas.load import ModelLoad, WorkerLoad
from schemas.registry import WorkerStatus
from schemas.subjects import Subjects
from services.common.errors import BUSY_REASONS
from services.registry.index import HEARTBEAT_LABEL
from services.router.core import FleetView
from services.router.deadline import Targets
from services.router.fields import read_fields
from services.router.forward import Forwarder
from services.router.gateway import Gateway
from services.router.metrics import RouterMetrics
from services.router.relay import Reply
from tests.helpers import eventually
from tests.helpers import ready_record as rec
from tests.memory_bus import MemoryBus

NOW = 100.0
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
FIELDS = read_fields(BODY)


def beat(wid: str, running: int, queued: int) -> WorkerLoad:
    """4 slots and 4 queue places, 2 s per request (a slot frees every 0.5 s), prefill ~0."""
    model = ModelLoad(
        id="m",
        in_flight=running,
        queue_depth=queued,
        max_in_flight=4,
        max_queue_depth=4,
        service_s=2.0,
        prefill_tokens_per_s=1e9,
    )
    return WorkerLoad(
        worker_id=wid,
        url=f"http://{wid}:1",
        status=WorkerStatus.READY,
        models=(model,),
        heartbeat_interval_s=60.0,
    )


FREE = (3, 0)  # a free slot: 0 s
FULL = (4, 4)  # no room; its estimate 2.5 s
DEEP = (4, 3)  # room, 4th in its queue: 2 s


class Answered:
    """A worker that answers 200 at once."""

    status, content_type, content_length, retry_after = 200, "application/json", 2, None

    async def read(self, timeout_s: float) -> bytes:
        return b"{}"

    def release(self) -> None:
        pass


class Upstream:
    """Stands in for the workers: remembers whom each attempt went to."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def post(self, url: str, path: str, body: bytes, request_id: str | None = None) -> Any:
        self.sent.append(url.removeprefix("http://").removesuffix(":1"))
        return Answered()


class Router:
    """A forwarder on a fleet view whose questions are counted."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, *loads: tuple[str, int, int], off: str = ""
    ) -> None:
        self.view = FleetView("cost")
        records = [rec(w) for w, _, _ in loads]
        records += [rec(off, {HEARTBEAT_LABEL: "off"})] if off else []
        self.view.set_records({r.id: r for r in records})
        for wid, running, queued in loads:
            self.view.heartbeat(wid, 1, 1, beat(wid, running, queued), NOW)
        self.asked: Counter[str] = Counter()
        for name in ("choose", "best_estimate"):
            monkeypatch.setattr(self.view, name, self._counted(name, getattr(self.view, name)))
        self.registry = CollectorRegistry()
        metrics = RouterMetrics(self.registry)
        subjects = Subjects.for_prefix("t")
        self.gateway = Gateway(
            MemoryBus(), subjects, metrics, lambda: None, queue_depth=8, max_wait_s=30.0
        )
        self.upstream = Upstream()
        self.forwarder = Forwarder(
            self.view,
            self.gateway,
            metrics,
            self.upstream,  # type: ignore[arg-type]
            clock=lambda: NOW,
            max_attempts=3,
            retry_budget_ratio=1.0,
            body_read_timeout_s=5.0,
            targets=Targets(default_s=10.0),
        )

    def _counted(self, name: str, ask: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kw: Any) -> Any:
            self.asked[name] += 1
            return ask(*args, **kw)

        return counted

    async def handle(self, target_s: float | None = None) -> Response | Reply:
        async def gone() -> None:
            await asyncio.Event().wait()

        answer = await self.forwarder.handle(
            "/v1/chat/completions",
            BODY,
            FIELDS,
            priority=0,
            gone=gone,
            began=0.0,
            ttft_target_s=target_s,
        )
        assert isinstance(answer, Response | Reply)
        return answer

    def gauge(self, name: str) -> float | None:
        return self.registry.get_sample_value(f"switchboard_router_{name}", {"model": "m"})

    def held(self) -> tuple[int, int]:
        core = self.gateway.gate("m").core
        return core.in_flight, core.queue_depth


def refusal(answer: Response | Reply) -> str:
    assert isinstance(answer, Response)
    assert answer.status_code == 503
    message: str = json.loads(bytes(answer.body))["error"]["message"]
    return message


async def test_a_request_a_replica_can_take_now_asks_the_fleet_view_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r = Router(monkeypatch, ("fast", *FREE))
    assert r.gauge("in_flight") is None  # no gate yet: no series
    answer = await r.handle()
    assert isinstance(answer, Reply)
    assert r.asked == {"choose": 1}  # no arrival estimate, no second choice
    assert r.upstream.sent == ["fast"]
    assert r.view.score("fast", "m") == 4  # counted once, as it was admitted
    assert r.held() == (1, 0)
    assert (r.gauge("in_flight"), r.gauge("queue_depth")) == (1, 0)  # exact when scraped
    await answer.done()  # its last byte sent
    assert r.held() == (0, 0)
    assert (r.gauge("in_flight"), r.gauge("queue_depth")) == (0, 0)
    assert r.gateway.gate("m").idle.is_set()


async def test_a_request_nobody_can_take_now_waits_without_being_asked_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r = Router(monkeypatch, ("fast", *FULL))  # 2.5 s, within the 10 s target, but no room
    waiting = asyncio.create_task(r.handle())
    await eventually(lambda: r.held() == (0, 1))
    assert r.asked == {"choose": 1, "best_estimate": 1}  # the gate did not ask it again
    assert r.gauge("queue_depth") == 1
    behind = asyncio.create_task(r.handle())  # someone waits: not asked whether it fits
    await eventually(lambda: r.held() == (0, 2))
    assert r.asked == {"choose": 1, "best_estimate": 2}
    r.view.heartbeat("fast", 1, 2, beat("fast", *DEEP), NOW)  # one place: the first goes
    r.gateway.fleet_moved(["m"])
    first = await asyncio.wait_for(waiting, 5)
    assert isinstance(first, Reply)
    assert r.upstream.sent == ["fast"]
    assert r.held() == (1, 1)
    assert (r.gauge("in_flight"), r.gauge("queue_depth")) == (1, 1)
    await first.done()
    behind.cancel()  # its client leaves while queued
    await asyncio.gather(behind, return_exceptions=True)
    assert r.held() == (0, 0)


async def test_a_request_no_replica_can_start_in_time_is_refused_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r = Router(monkeypatch, ("fast", *FULL))  # 2.5 s at best
    answer = await r.handle(target_s=1.0)
    assert BUSY_REASONS["deadline"] in refusal(answer)
    assert r.asked == {"choose": 1, "best_estimate": 1}
    assert r.held() == (0, 0)
    assert r.upstream.sent == []


async def test_a_replica_heard_from_long_ago_is_taken_only_as_the_estimate_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tier 1 (heartbeats off: load unknown) has room while the fresh replica is full: the arrival
    estimate, over the fresh tier, still decides whether the request may be taken at all."""
    r = Router(monkeypatch, ("fast", *FULL), off="manual")
    answer = await r.handle(target_s=1.0)  # 2.5 s on the fresh replica: too late
    assert BUSY_REASONS["deadline"] in refusal(answer)
    assert r.upstream.sent == []
    assert r.view.score("manual", "m") == 0  # nothing counted
    answer = await r.handle(target_s=5.0)
    assert isinstance(answer, Reply)
    assert r.upstream.sent == ["manual"]
    assert r.view.score("manual", "m") == 1
    assert r.asked == {"choose": 2, "best_estimate": 2}  # found once each, never asked again
    await answer.done()


async def test_replicas_without_heartbeats_are_asked_once_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No replica is fresh (heartbeats off): the one chosen is in the tier the estimate looks at."""
    r = Router(monkeypatch, off="manual")
    answer = await r.handle(target_s=1.0)
    assert isinstance(answer, Reply)
    assert r.asked == {"choose": 1}
    assert r.upstream.sent == ["manual"]
    await answer.done()


async def test_with_no_eligible_replica_the_attempt_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r = Router(monkeypatch, ("fast", *FREE))
    r.view.busy("fast", 5.0, NOW)  # cooling down after a refusal
    answer = await r.handle()
    assert isinstance(answer, Response)
    assert (answer.status_code, answer.headers["x-switchboard-origin"]) == (503, "router")
    assert json.loads(bytes(answer.body))["error"]["code"] == "no_replica_available"
    assert r.held() == (0, 0)


async def test_a_draining_gateway_refuses_newcomers(monkeypatch: pytest.MonkeyPatch) -> None:
    r = Router(monkeypatch, ("fast", *DEEP))
    r.gateway.drain()
    assert BUSY_REASONS["draining"] in refusal(await r.handle())
    assert r.upstream.sent == []
    assert r.view.score("fast", "m") == 7  # nothing counted
