"""Every service's metrics: one prefix, process collector on, no `_created` series."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from services.capacity.shell import CapacityMetrics
from services.common.metrics import PREFIX, new_registry
from services.registry.shell import RegistryMetrics
from services.router.metrics import RouterMetrics
from services.worker.metrics import WorkerMetrics

STANDARD = ("process_", "python_")  # the standard collectors keep their well-known names


def test_every_service_metric_carries_the_prefix() -> None:
    builders: list[Callable[[CollectorRegistry], object]] = [
        WorkerMetrics,
        RouterMetrics,
        RegistryMetrics,
        CapacityMetrics,
    ]
    for build in builders:
        registry = new_registry()
        build(registry)
        names = {family.name for family in registry.collect()}
        ours = {n for n in names if not n.startswith(STANDARD)}
        assert ours, build
        assert {n for n in ours if not n.startswith(PREFIX)} == set(), build


def test_process_collector_on_and_created_series_off() -> None:
    registry = new_registry()
    metrics = RouterMetrics(registry)
    metrics.requests.labels("m", "ok").inc()
    metrics.duration.labels("m").observe(0.1)
    text = generate_latest(registry).decode()
    assert "process_cpu_seconds_total" in text
    assert "python_info" in text
    assert "_created" not in text
    assert 'switchboard_router_request_duration_seconds_count{model="m"} 1.0' in text
