"""Worker Prometheus metrics, built on a registry the shell gives it; `model` is a served one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.in_flight = Gauge(
            "switchboard_worker_in_flight", "Running requests.", ["model"], registry=registry
        )
        self.queue_depth = Gauge(
            "switchboard_worker_queue_depth", "Queued requests.", ["model"], registry=registry
        )
        self.rejections = Counter(
            "switchboard_worker_admission_rejections_total",
            "Requests refused by admission.",
            ["model", "reason"],
            registry=registry,
        )
        self.duration = Histogram(
            "switchboard_worker_request_duration_seconds",
            "Time holding a slot.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "switchboard_worker_time_to_first_token_seconds",
            "Admission to first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "switchboard_worker_tokens_generated_total",
            "Completion tokens.",
            ["model"],
            registry=registry,
        )

        # vLLM's names (prefix_cache_queries / _hits), counted in blocks where vLLM counts tokens:
        # hits / queries is the share of looked-up prompt the cache held.
        self.prefix_queries = Counter(
            "switchboard_worker_prefix_cache_queries_total",
            "Prompt blocks looked up in the prefix cache.",
            ["model"],
            registry=registry,
        )
        self.prefix_hits = Counter(
            "switchboard_worker_prefix_cache_hits_total",
            "Prompt blocks the prefix cache held (leading blocks only).",
            ["model"],
            registry=registry,
        )

    def observe_done(self, model: str, duration_s: float, tokens: int) -> None:
        self.duration.labels(model).observe(duration_s)
        self.tokens.labels(model).inc(tokens)

    def observe_prefix(self, model: str, blocks: int, hits: int) -> None:
        self.prefix_queries.labels(model).inc(blocks)
        self.prefix_hits.labels(model).inc(hits)
