"""The fleet page's feed after its first message: only what changed (router/dashboard.py)."""

from __future__ import annotations

import msgspec

from schemas.capacity import CapacitySource, CapacityView, ModelCapacity
from schemas.dashboard import DashboardWorker, FleetSnapshot, GatewayLoad
from schemas.load import ModelLoad
from schemas.registry import WorkerStatus
from services.router.dashboard import Sent

S = WorkerStatus


def row(
    worker_id: str, status: WorkerStatus = S.READY, age: float = 0.2, busy: int = 0
) -> DashboardWorker:
    load = ModelLoad(id="m", in_flight=busy, queue_depth=0, max_in_flight=4, max_queue_depth=8)
    return DashboardWorker(
        id=worker_id,
        url=f"http://{worker_id}:8000",
        status=status,
        models=("m",),
        load=(load,),
        heartbeat_age_s=age,
        fresh=True,
    )


def capacity(n: int) -> CapacityView:
    one = ModelCapacity(capacity=n, source=CapacitySource.WORKER_REPORTED, workers_available=1)
    return CapacityView(fleet=one, models={"m": one})


def snap(*workers: DashboardWorker, seq: int = 1, **kw: object) -> FleetSnapshot:
    fields: dict[str, object] = {"capacity": None, "gateway": {}} | kw
    return FleetSnapshot(workers=workers, registry_epoch=1, registry_seq=seq, **fields)  # type: ignore[arg-type]


def test_heartbeats_with_the_same_load_are_no_news() -> None:
    sent = Sent(snap(row("a"), row("b"), row("c")))
    assert sent.delta(snap(row("a", age=0.9), row("b", age=0.4), row("c", age=1.0))) is None


def test_one_changed_worker_is_the_only_row_sent() -> None:
    sent = Sent(snap(row("a"), row("b"), row("c")))
    delta = sent.delta(snap(row("a", age=0.7), row("b", S.DRAINING, age=0.5), row("c"), seq=2))
    assert delta is not None
    assert delta.workers == (row("b", S.DRAINING, age=0.5),)
    assert (delta.removed, delta.capacity, delta.gateway, delta.registry_seq) == ((), None, {}, 2)
    # the viewer holds it now: the same again is no news
    assert sent.delta(snap(row("a"), row("b", S.DRAINING), row("c"), seq=2)) is None


def test_load_freshness_additions_and_removals_are_news() -> None:
    sent = Sent(snap(row("a"), row("b")))
    stale = msgspec.structs.replace(row("b", age=9.0), fresh=False)
    delta = sent.delta(snap(row("a", busy=3), stale, row("c"), seq=2))
    assert delta is not None
    assert [w.id for w in delta.workers] == ["a", "b", "c"]
    delta = sent.delta(snap(row("a", busy=3), seq=3))
    assert delta is not None
    assert (delta.workers, delta.removed) == ((), ("b", "c"))


def test_capacity_and_gates_are_sent_when_they_change_and_only_the_gates_that_did() -> None:
    gates = {"m": GatewayLoad(in_flight=0, queue_depth=0, limit=4)}
    sent = Sent(snap(row("a"), gateway=gates))
    moved = {"m": GatewayLoad(in_flight=1, queue_depth=0, limit=4)}
    new = {"n": GatewayLoad(in_flight=0, queue_depth=0, limit=2)}
    delta = sent.delta(snap(row("a"), capacity=capacity(4), gateway=moved | new))
    assert delta is not None
    assert (delta.workers, delta.capacity, delta.gateway) == ((), capacity(4), moved | new)
    delta = sent.delta(snap(row("a"), capacity=capacity(4), gateway=moved | new))
    assert delta is None
    delta = sent.delta(snap(row("a"), capacity=capacity(4), gateway=gates | new))
    assert delta is not None
    assert (delta.capacity, delta.gateway) == (None, gates)
