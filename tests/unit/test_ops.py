"""The status table renders workers, per-model load, heartbeat age and capacity tiers."""

from __future__ import annotations

from schemas.capacity import CapacitySource, CapacityView, ModelCapacity
from schemas.load import ModelLoad, WorkerLoad
from schemas.registry import RegistrySnapshot, WorkerRecord, WorkerStatus
from services.ops import render_status


def test_render_status() -> None:
    a = WorkerRecord(
        id="w-a", url="http://a:1", models=("llama", "qwen"), status=WorkerStatus.READY, revision=2
    )
    b = WorkerRecord(
        id="w-b", url="http://b:1", models=("llama",), status=WorkerStatus.NOT_READY, revision=3
    )
    load = WorkerLoad(
        worker_id="w-a",
        url="http://a:1",
        status=WorkerStatus.READY,
        models=(
            ModelLoad(id="llama", in_flight=3, queue_depth=1, max_in_flight=8, max_queue_depth=16),
        ),
    )
    cap = CapacityView(
        fleet=ModelCapacity(capacity=64, source=CapacitySource.MIXED, workers_available=1),
        models={
            "llama": ModelCapacity(capacity=64, source=CapacitySource.MIXED, workers_available=1)
        },
    )
    text = render_status(
        RegistrySnapshot(epoch=7, seq=42, workers=(a, b)), {"w-a": (100.0, load)}, cap, 101.5
    )
    lines = text.splitlines()
    assert lines[0].split() == [
        "WORKER",
        "STATUS",
        "URL",
        "MODEL",
        "IN_FLIGHT",
        "QUEUE",
        "HEARTBEAT",
    ]
    assert lines[1].split() == ["w-a", "ready", "http://a:1", "llama", "3/8", "1/16", "1.5s", "ago"]
    assert lines[2].split() == ["qwen", "?", "?"]  # served, but no load reported for it
    assert lines[3].split() == ["w-b", "not_ready", "http://b:1", "llama", "?", "?", "never"]
    assert "registry epoch 7 seq 42, 2 workers" in text
    assert "capacity: fleet 64 (mixed, 1 healthy)" in text
    assert "  llama: 64 (mixed, 1 healthy)" in text
    unknown = render_status(RegistrySnapshot(epoch=1, seq=0, workers=()), {}, None, 0.0)
    assert "capacity: unknown" in unknown
