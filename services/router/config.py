"""Router config: ingress, API keys, priority caps, body cap, timeouts, retries, gateway queue,
TTFT targets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated

import msgspec

from services.common.config import Port, ServiceConfig, load_config
from services.router.deadline import Targets
from services.router.policy import PolicyName

Seconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]


class RouterConfig(ServiceConfig, frozen=True, kw_only=True):
    http_host: str = "127.0.0.1"
    http_port: Port = 8080
    # Several router processes may share the port (SO_REUSEPORT); the kernel spreads connections.
    reuse_port: bool = True
    # Empty: no auth. Otherwise every /v1/* request needs "Authorization: Bearer <one of these>".
    api_keys: tuple[str, ...] = ()
    # The highest x-switchboard-priority a request may ask for (higher asks are clamped to it),
    # so no key jumps other keys' queues unless an operator grants it: key_max_priority maps an
    # API key to its own cap (ROUTER_KEY_MAX_PRIORITY=k1=5,k2=10). Lower priorities: always.
    max_priority: int = 0
    key_max_priority: dict[str, int] = msgspec.field(default_factory=dict)
    request_body_limit: Annotated[int, msgspec.Meta(ge=1024, le=256 << 20)] = 4 << 20
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    retry_budget_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.2
    connect_timeout_s: Seconds = 2.0
    # Until the worker's response headers (covers time in the worker's own queue).
    header_timeout_s: Seconds = 90.0
    # Between two pieces of a response body (SSE chunks).
    body_read_timeout_s: Seconds = 120.0
    # Shorter than the worker's keep-alive (75 s), so the pool never reuses a socket the worker
    # is about to close (a source of connection resets in other gateways).
    upstream_keepalive_s: Seconds = 30.0
    upstream_pool_size: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1024
    gateway_queue_depth: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 256
    gateway_max_wait_s: Seconds = 10.0
    # Time to first token a request is meant to meet (docs/router.md, "Gateway admission"): it
    # waits at the gateway only while the best replica's estimate can still meet it, and is
    # refused at once when it cannot. Per model (ROUTER_MODEL_TTFT_TARGET_S=m1=5,m2=30); a
    # priority at or above P gets at least its entry (ROUTER_PRIORITY_TTFT_TARGET_S=1=20,5=60);
    # a client may ask for any target up to max_ttft_target_s (x-switchboard-ttft-target-s).
    ttft_target_s: Seconds = 10.0
    model_ttft_target_s: dict[str, Seconds] = msgspec.field(default_factory=dict)
    priority_ttft_target_s: dict[int, Seconds] = msgspec.field(default_factory=dict)
    max_ttft_target_s: Seconds = 60.0
    # This router's share of each model's capacity (1/N with N routers side by side).
    capacity_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    checkpoint_interval_s: Seconds = 5.0
    # Replica choice (docs/router.md): cost = least estimated time to first token (load, the
    # worker's measured speed, the prompt blocks its prefix cache holds); least_busy = fewest
    # requests in flight and queued, ties to the smallest id (the policy before cost).
    policy: PolicyName = "cost"
    # Log one in this many successful requests' `request` lines (each sampled line says how many
    # it stands for, `one_in`); refusals and errors are always logged. 1: every line. A busy
    # router spends a few % of its CPU on these lines; metrics count every request regardless.
    request_log_every: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1
    # The live fleet page at /dashboard (behind the API keys when there are any).
    dashboard: bool = True
    # At most one dashboard update per this many seconds per viewer, however busy the fleet.
    dashboard_interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=60)] = 0.25

    def targets(self) -> Targets:
        return Targets(
            default_s=self.ttft_target_s,
            per_model=self.model_ttft_target_s,
            per_priority=self.priority_ttft_target_s,
            max_s=self.max_ttft_target_s,
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        # A cap for a key nobody checks would let any client claim it by sending that token.
        unknown = set(self.key_max_priority) - set(self.api_keys)
        if unknown:
            raise ValueError(f"key_max_priority names {len(unknown)} key(s) not in api_keys")


def load(argv: Sequence[str], environ: Mapping[str, str]) -> RouterConfig:
    return load_config(RouterConfig, "router", argv, environ)
