"""Router Prometheus metrics, built on the registry main.py gives it (no globals)."""

from __future__ import annotations

from typing import Any, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import BusMetrics

M = TypeVar("M", Counter, Gauge, Histogram)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    """`model` labels are models the fleet serves (or "unknown"): clients cannot mint them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.prometheus = registry  # tests read values through it (get_sample_value)
        self.requests = Counter(
            "switchboard_router_requests_total",
            "Requests by outcome.",
            ["model", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "switchboard_router_request_duration_seconds",
            "Whole request.",
            ["model"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.ttfb = Histogram(
            "switchboard_router_time_to_first_byte_seconds",
            "Until the first body byte.",
            ["model"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "switchboard_router_upstream_retries_total",
            "Attempts sent again: on another replica (connect, busy), or once more to the same "
            "worker on a fresh connection when a reused one closed before any byte "
            "(stale_connection).",
            ["reason"],
            registry=registry,
        )
        self.backpressure = Counter(
            "switchboard_router_backpressure_total",
            "503/429 sent to clients.",
            ["origin"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "switchboard_router_queue_depth", "Gateway queue.", ["model"], registry=registry
        )
        self.in_flight = Gauge(
            "switchboard_router_in_flight", "Requests in flight.", ["model"], registry=registry
        )
        self.stale = Gauge(
            "switchboard_router_stale_heartbeats",
            "Ready workers with stale heartbeats.",
            registry=registry,
        )
        self.kv_resyncs = Counter(
            "switchboard_router_kv_resyncs_total",
            "Prefix-cache streams dropped for a gap or a new epoch (until the next snapshot).",
            registry=registry,
        )
        self.dashboard_viewers = Gauge(
            "switchboard_router_dashboard_viewers", "Open /dashboard live feeds.", registry=registry
        )
        self.bus = BusMetrics(registry, "router")
        # Labelled children the request path touches, made once: `.labels()` checks, joins and
        # locks on every call. Keys come only from the label sets above (bounded likewise).
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: M, *labels: str) -> M:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return cast(M, child)

    def requests_of(self, model: str, outcome: str) -> Counter:
        return self._child(self.requests, model, outcome)

    def duration_of(self, model: str) -> Histogram:
        return self._child(self.duration, model)

    def ttfb_of(self, model: str) -> Histogram:
        return self._child(self.ttfb, model)

    def backpressure_of(self, origin: str) -> Counter:
        return self._child(self.backpressure, origin)

    def queue_depth_of(self, model: str) -> Gauge:
        return self._child(self.queue_depth, model)

    def in_flight_of(self, model: str) -> Gauge:
        return self._child(self.in_flight, model)
