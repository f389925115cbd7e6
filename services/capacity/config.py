"""Capacity config: override (0 = derive), slots per non-reporting worker, fallback, checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated

import msgspec

from schemas.capacity import MAX_CAPACITY
from services.common.config import Port, ServiceConfig, load_config

Capacity = Annotated[int, msgspec.Meta(ge=0, le=MAX_CAPACITY)]
PositiveCapacity = Annotated[int, msgspec.Meta(ge=1, le=MAX_CAPACITY)]


class CapacityConfig(ServiceConfig, frozen=True, kw_only=True):
    http_host: str = "127.0.0.1"
    http_port: Port = 8082
    # 0 = derive from the workers; 1..65535 = the operator's number; anything else fails at start.
    override: Capacity = 0
    model_overrides: dict[str, PositiveCapacity] = msgspec.field(default_factory=dict)
    slots_per_worker: PositiveCapacity = 64
    legacy_max_concurrent_requests: PositiveCapacity = 1024
    checkpoint_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    snapshot_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0
    kv_bucket: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+$")] = "capacity"
    # Copies of the KV bucket on a NATS cluster (3 survives losing a node); used at creation.
    kv_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1


def load(argv: Sequence[str], environ: Mapping[str, str]) -> CapacityConfig:
    return load_config(CapacityConfig, "capacity", argv, environ)
