"""Prometheus helpers: each service builds its metrics on a registry it is given (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


def new_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


class BusMetrics:
    """What every NATS consumer counts: messages it could not decode, per subject pattern."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.rejected = Counter(
            f"{service}_messages_rejected_total",
            "Messages dropped because they failed to decode or validate.",
            ["subject"],
            registry=registry,
        )
