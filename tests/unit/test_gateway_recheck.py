"""The router re-examines a model's gateway queue when a replica of that model may have room: on
a heartbeat of one of its workers, or any registry change; never on another model's heartbeat
(1000 workers beat 1000 times a second)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry

from schemas import codec
from schemas.load import ModelLoad, WorkerLoad
from schemas.registry import WorkerRecord, WorkerStatus
from schemas.subjects import Subjects
from services.admission.gate import Gate
from services.common.seq import Sequencer
from services.router.deadline import Placement
from services.router.metrics import RouterMetrics
from services.router.policy import Prompt
from services.router.shell import RouterShell
from tests.memory_bus import MemoryBus

PRINCIPAL = "worker-user"
SUBJECTS = Subjects.for_prefix("t")
WAIT_S = 60.0  # far longer than the test: nothing leaves the queue by timing out


def record(worker_id: str, *models: str) -> WorkerRecord:
    return WorkerRecord(
        id=worker_id,
        url=f"http://{worker_id}:1",
        models=models,
        status=WorkerStatus.READY,
        revision=1,
        owner=PRINCIPAL,
    )


class Fleet:
    """Heartbeats of workers with one slot per model, as their owner publishes them."""

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self.sequencers: dict[str, Sequencer] = {}

    async def beat(self, worker: WorkerRecord, in_flight: int) -> None:
        """One heartbeat; returns once the router has taken it."""
        seq = self.sequencers.setdefault(worker.id, Sequencer(worker.id, epoch=1))
        load = WorkerLoad(
            worker_id=worker.id,
            url=worker.url,
            status=WorkerStatus.READY,
            models=tuple(
                ModelLoad(
                    id=m, in_flight=in_flight, queue_depth=0, max_in_flight=1, max_queue_depth=0
                )
                for m in worker.models
            ),
            heartbeat_interval_s=60.0,  # fresh for the whole test
        )
        env = seq.stamp(load, time.time())
        await self.bus.publish(SUBJECTS.load(PRINCIPAL, worker.id), codec.encode(env))
        await self.bus.settled()


async def test_a_queued_request_is_re_examined_only_by_heartbeats_of_its_models_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bus = MemoryBus()
    shell = RouterShell(
        bus, SUBJECTS, RouterMetrics(CollectorRegistry()), queue_depth=8, max_wait_s=WAIT_S
    )
    await shell.start()
    a1, b1, ab = record("a1", "A"), record("b1", "B"), record("ab", "B", "C")
    shell.view.set_records({w.id: w for w in (a1, b1, ab)})
    fleet = Fleet(bus)
    for worker in (a1, b1, ab):
        await fleet.beat(worker, in_flight=1)  # every slot taken

    gates = {m: shell.gateway.gate(m) for m in ("A", "B", "C")}
    rechecks: Counter[str] = Counter()

    def count(model: str, gate: Gate) -> None:
        original = gate.recheck

        def counted() -> None:
            rechecks[model] += 1
            original()

        monkeypatch.setattr(gate, "recheck", counted)

    for model, gate in gates.items():
        count(model, gate)

    place = Placement(shell.view, shell.clock, "A", Prompt(), deadline=shell.clock() + WAIT_S)
    asked = 0

    def fits() -> bool:
        nonlocal asked
        asked += 1
        return place.fits()

    async def request() -> str | None:
        async with gates["A"].slot(patience_s=WAIT_S, fits=fits):
            return None if place.choice is None else place.choice.worker_id

    waiting = asyncio.create_task(request())
    await bus.settled()
    assert gates["A"].core.queue_depth == 1  # a1 has no room: it waits at the gateway
    assert asked == 1

    await fleet.beat(b1, in_flight=0)  # room, but for model B only
    await fleet.beat(ab, in_flight=0)
    assert rechecks == {"B": 2, "C": 1}
    assert asked == 1  # A's queue was not looked at
    assert gates["A"].core.queue_depth == 1

    await fleet.beat(a1, in_flight=1)  # still full: looked at, still waits
    assert rechecks["A"] == 1
    assert asked == 2
    assert gates["A"].core.queue_depth == 1

    await fleet.beat(a1, in_flight=0)  # a1 has room: the request goes to it
    assert await asyncio.wait_for(waiting, 5.0) == "a1"
    assert rechecks["A"] == 2
    assert asked == 3

    shell.gateway.fleet_moved()  # a registry change: every model's queue
    assert rechecks == {"A": 3, "B": 3, "C": 2}
    await bus.close()
