"""Prometheus helpers: each service builds its metrics on a registry it is given (no globals)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

# Every metric of ours starts with this (process_* and python_* keep their standard names).
PREFIX = "switchboard_"
UNKNOWN = "unknown"  # the label value for anything outside a label's known set


def new_registry() -> CollectorRegistry:
    """A registry with the process (CPU, memory, fds) and platform (python_info) collectors."""
    # A `_created` series per labelled child bloats every scrape and nobody reads it. The switch
    # is process-wide in prometheus_client; every service's registry comes from here.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class BusMetrics:
    """What every NATS consumer counts: messages it could not decode, per subject pattern."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.rejected = Counter(
            f"{PREFIX}{service}_messages_rejected_total",
            "Messages dropped because they failed to decode or validate.",
            ["subject"],
            registry=registry,
        )
