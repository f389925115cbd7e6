"""Capacity computation: 4 precedence tiers for the fleet and per model. Pure, no I/O.

Tiers, in precedence order (first that applies wins):
1. Override        operator value > 0 (per-model override first, then the fleet override)
2. WorkerReported  every healthy worker reports its slots: their sum
3. Mixed           some or none report: reporters' values + slots_per_worker per non-reporter
4. LegacyFallback  no healthy workers: legacy_max_concurrent_requests
Healthy = status Ready. A worker's slots (`slots`): for the fleet its max_running_requests; for
one model its model_slots entry, else its max_running_requests (a record without per-model
limits). Results saturate at 65535 (MAX_CAPACITY).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from schemas.capacity import MAX_CAPACITY, CapacitySource, CapacityView, ModelCapacity
from schemas.registry import WorkerRecord, WorkerStatus


class CapacitySettings(msgspec.Struct, frozen=True, kw_only=True):
    override: int = 0
    slots_per_worker: int = 64
    legacy_max_concurrent_requests: int = 1024
    model_overrides: Mapping[str, int] = msgspec.field(default_factory=dict)


def slots(worker: WorkerRecord, model: str | None = None) -> int | None:
    """How many requests the worker says it runs at once: in all (model None) or of one model.
    A multi-model worker's total is shared by its models, so a model's share is its own entry
    when the worker reports one; None: the worker does not say."""
    if model is not None and model in worker.model_slots:
        return worker.model_slots[model]
    return worker.max_running_requests


def compute(
    settings: CapacitySettings,
    healthy: Iterable[WorkerRecord],
    override: int | None = None,
    model: str | None = None,
) -> tuple[int, CapacitySource]:
    """Capacity of a set of healthy workers (for one model, or all) and the tier it came from."""
    chosen_override = settings.override if override is None else override
    if chosen_override > 0:
        return min(chosen_override, MAX_CAPACITY), CapacitySource.OVERRIDE
    workers = list(healthy)
    if not workers:
        return min(
            settings.legacy_max_concurrent_requests, MAX_CAPACITY
        ), CapacitySource.LEGACY_FALLBACK
    reported = [n for n in (slots(w, model) for w in workers) if n is not None]
    total = sum(reported) + settings.slots_per_worker * (len(workers) - len(reported))
    source = (
        CapacitySource.WORKER_REPORTED if len(reported) == len(workers) else CapacitySource.MIXED
    )
    return min(total, MAX_CAPACITY), source


def _entry(
    settings: CapacitySettings,
    healthy: list[WorkerRecord],
    override: int | None,
    model: str | None = None,
) -> ModelCapacity:
    capacity, source = compute(settings, healthy, override, model)
    return ModelCapacity(capacity=capacity, source=source, workers_available=len(healthy))


def compute_view(
    settings: CapacitySettings, workers: Iterable[WorkerRecord], epoch: int = 0, seq: int = 0
) -> CapacityView:
    """Fleet capacity plus one entry per model any known worker serves (healthy or not)."""
    all_workers = list(workers)
    healthy = [w for w in all_workers if w.status == WorkerStatus.READY]
    models = sorted({m for w in all_workers for m in w.models})
    per_model = {
        model: _entry(
            settings,
            [w for w in healthy if model in w.models],
            settings.model_overrides.get(model) or None,
            model,
        )
        for model in models
    }
    return CapacityView(
        fleet=_entry(settings, healthy, None),
        models=per_model,
        registry_epoch=epoch,
        registry_seq=seq,
    )


def worth_publishing(old: CapacityView | None, new: CapacityView) -> bool:
    """Publish on any change of value or source (fleet or any model) or of the model set."""
    if old is None:
        return True
    return old.fleet != new.fleet or old.models != new.models
