"""Capacity compute: all four tiers, per model, saturation and override edges."""

from __future__ import annotations

import pytest

from schemas.capacity import CapacitySource, CapacityView, ModelCapacity
from schemas.registry import WorkerRecord, WorkerStatus
from services.capacity.core import CapacitySettings, compute, compute_view, worth_publishing

S = WorkerStatus
C = CapacitySource


def w(
    worker_id: str,
    mrr: int | None = None,
    models: tuple[str, ...] = ("m",),
    status: WorkerStatus = S.READY,
    slots: dict[str, int] | None = None,
) -> WorkerRecord:
    return WorkerRecord(
        id=worker_id,
        url=f"http://{worker_id}:1",
        models=models,
        status=status,
        revision=1,
        max_running_requests=mrr,
        model_slots=slots or {},
    )


DEFAULT = CapacitySettings()

COMPUTE_CASES = [
    # (settings, workers, expected)
    (DEFAULT, [], (1024, C.LEGACY_FALLBACK)),
    (CapacitySettings(legacy_max_concurrent_requests=7), [], (7, C.LEGACY_FALLBACK)),
    (DEFAULT, [w("a", 256)], (256, C.WORKER_REPORTED)),
    (DEFAULT, [w("a", 256), w("b", 100)], (356, C.WORKER_REPORTED)),
    (DEFAULT, [w("a", 256), w("b")], (320, C.MIXED)),
    (DEFAULT, [w("a"), w("b")], (128, C.MIXED)),  # none report: still Mixed
    (CapacitySettings(slots_per_worker=10), [w("a"), w("b", 5)], (15, C.MIXED)),
    (CapacitySettings(override=500), [w("a", 256)], (500, C.OVERRIDE)),
    (CapacitySettings(override=500), [], (500, C.OVERRIDE)),
    (CapacitySettings(override=1), [w("a", 9)], (1, C.OVERRIDE)),
    (CapacitySettings(override=0), [w("a", 9)], (9, C.WORKER_REPORTED)),
    # saturation at 65535
    (DEFAULT, [w("a", 65535), w("b", 1)], (65535, C.WORKER_REPORTED)),
    (DEFAULT, [w("a", 65534), w("b", 1)], (65535, C.WORKER_REPORTED)),
    (DEFAULT, [w("a", 65534)], (65534, C.WORKER_REPORTED)),
    (CapacitySettings(slots_per_worker=65535), [w(str(i)) for i in range(3)], (65535, C.MIXED)),
    (CapacitySettings(override=65535), [], (65535, C.OVERRIDE)),
    (CapacitySettings(override=70000), [], (65535, C.OVERRIDE)),
]


@pytest.mark.parametrize(("settings", "workers", "expected"), COMPUTE_CASES)
def test_compute(
    settings: CapacitySettings, workers: list[WorkerRecord], expected: tuple[int, CapacitySource]
) -> None:
    assert compute(settings, workers) == expected


def test_view_only_counts_ready_workers_and_is_per_model() -> None:
    workers = [
        w("a", 256, ("llama",)),
        w("b", None, ("llama", "qwen")),
        w("c", 32, ("qwen",), status=S.NOT_READY),
        w("d", 8, ("mistral",), status=S.DRAINING),
        w("e", 4, ("qwen",), status=S.PENDING),
    ]
    view = compute_view(DEFAULT, workers, epoch=3, seq=9)
    assert view.fleet == ModelCapacity(capacity=320, source=C.MIXED, workers_available=2)
    assert view.models == {
        "llama": ModelCapacity(capacity=320, source=C.MIXED, workers_available=2),
        "qwen": ModelCapacity(capacity=64, source=C.MIXED, workers_available=1),
        # a known model with no healthy worker: LegacyFallback, 0 available
        "mistral": ModelCapacity(capacity=1024, source=C.LEGACY_FALLBACK, workers_available=0),
    }
    assert (view.registry_epoch, view.registry_seq) == (3, 9)


def test_idle_model_cannot_hide_a_saturated_one() -> None:
    """SMG #2069: one fleet number hides a small model behind a big one; per-model does not."""
    view = compute_view(DEFAULT, [w("big", 1000, ("a",)), w("small", 2, ("b",))])
    assert view.fleet.capacity == 1002
    assert view.models["b"].capacity == 2


def cap(capacity: int, source: CapacitySource, available: int = 1) -> ModelCapacity:
    return ModelCapacity(capacity=capacity, source=source, workers_available=available)


PER_MODEL_CASES = [
    # (workers, expected fleet, expected per model)
    (  # issue #15: a worker serving a and b with 8 slots each is 8 + 8, not 16 for each
        [w("x", 16, ("a", "b"), slots={"a": 8, "b": 8})],
        cap(16, C.WORKER_REPORTED),
        {"a": cap(8, C.WORKER_REPORTED), "b": cap(8, C.WORKER_REPORTED)},
    ),
    (  # a record without model_slots (an older worker): its total for each model, as before
        [w("x", 16, ("a", "b"))],
        cap(16, C.WORKER_REPORTED),
        {"a": cap(16, C.WORKER_REPORTED), "b": cap(16, C.WORKER_REPORTED)},
    ),
    (  # old and new records together: each counts by what it reports
        [w("x", 16, ("a", "b"), slots={"a": 12, "b": 4}), w("y", 10, ("a",))],
        cap(26, C.WORKER_REPORTED, 2),
        {"a": cap(22, C.WORKER_REPORTED, 2), "b": cap(4, C.WORKER_REPORTED)},
    ),
    (  # a model missing from model_slots falls back to the worker's total
        [w("x", 16, ("a", "b"), slots={"a": 8})],
        cap(16, C.WORKER_REPORTED),
        {"a": cap(8, C.WORKER_REPORTED), "b": cap(16, C.WORKER_REPORTED)},
    ),
    (  # no total but per-model slots: reporting for its models, Mixed for the fleet
        [w("x", None, ("a", "b"), slots={"a": 8, "b": 8}), w("y", 4, ("a",))],
        cap(68, C.MIXED, 2),
        {"a": cap(12, C.WORKER_REPORTED, 2), "b": cap(8, C.WORKER_REPORTED)},
    ),
    (  # reports for a only: b counts it as a non-reporter (slots_per_worker)
        [w("x", None, ("a", "b"), slots={"a": 8}), w("y", 4, ("b",))],
        cap(68, C.MIXED, 2),
        {"a": cap(8, C.WORKER_REPORTED), "b": cap(68, C.MIXED, 2)},
    ),
    (  # not Ready: counts nowhere, its models still listed
        [w("x", 16, ("a", "b"), slots={"a": 8, "b": 8}, status=S.DRAINING)],
        cap(1024, C.LEGACY_FALLBACK, 0),
        {"a": cap(1024, C.LEGACY_FALLBACK, 0), "b": cap(1024, C.LEGACY_FALLBACK, 0)},
    ),
]


@pytest.mark.parametrize(
    ("workers", "fleet", "models"),
    PER_MODEL_CASES,
    ids=["8+8", "old_record", "old_and_new", "partial", "no_total", "reports_one", "not_ready"],
)
def test_per_model_capacity_counts_each_workers_slots_for_that_model(
    workers: list[WorkerRecord], fleet: ModelCapacity, models: dict[str, ModelCapacity]
) -> None:
    view = compute_view(DEFAULT, workers)
    assert view.fleet == fleet  # the fleet total stays the sum of max_running_requests
    assert view.models == models


def test_model_override_beats_fleet_override_and_derived() -> None:
    settings = CapacitySettings(override=50, model_overrides={"a": 7})
    view = compute_view(settings, [w("x", 256, ("a", "b"))])
    assert view.fleet == ModelCapacity(capacity=50, source=C.OVERRIDE, workers_available=1)
    assert view.models["a"] == ModelCapacity(capacity=7, source=C.OVERRIDE, workers_available=1)
    assert view.models["b"] == ModelCapacity(capacity=50, source=C.OVERRIDE, workers_available=1)


def test_changed_sees_value_source_and_model_set() -> None:
    base = compute_view(DEFAULT, [w("a", 64)])
    assert worth_publishing(None, base)
    same_position_moved = CapacityView(fleet=base.fleet, models=base.models, registry_seq=99)
    assert not worth_publishing(base, same_position_moved)
    # same number, different tier: Mixed with a non-reporter worth 64
    source_only = compute_view(DEFAULT, [w("a")])
    assert source_only.fleet.capacity == base.fleet.capacity
    assert worth_publishing(base, source_only)
    assert worth_publishing(base, compute_view(DEFAULT, [w("a", 64, ("m", "n"))]))


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"CAPACITY_OVERRIDE": "-1"}, "override"),
        ({"CAPACITY_OVERRIDE": "65536"}, "override"),
        ({"CAPACITY_SLOTS_PER_WORKER": "0"}, "slots_per_worker"),
        ({"CAPACITY_LEGACY_MAX_CONCURRENT_REQUESTS": "0"}, "legacy_max_concurrent_requests"),
        ({"CAPACITY_CHECKPOINT_INTERVAL_S": "0"}, "checkpoint_interval_s"),
        ({"CAPACITY_MODEL_OVERRIDES": "llama=0"}, "model_overrides"),
    ],
)
def test_capacity_config_out_of_range_fails_naming_the_field(
    env: dict[str, str], field: str
) -> None:
    from services.capacity.config import load
    from services.common.errors import ConfigError

    with pytest.raises(ConfigError, match=f"field '{field}'"):
        load([], env)


def test_capacity_config_accepts_edges() -> None:
    from services.capacity.config import load

    cfg = load(["--override", "65535"], {"CAPACITY_MODEL_OVERRIDES": "llama=8,qwen=16"})
    assert cfg.override == 65535
    assert cfg.model_overrides == {"llama": 8, "qwen": 16}
    assert load([], {}).override == 0
