"""Fleet-page wire types: what the router streams to /dashboard (SSE, one JSON object per event)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.base import Count, ModelId, WireStruct, WorkerId
from schemas.capacity import CapacityView
from schemas.load import ModelLoad
from schemas.registry import Url, WorkerStatus


class GatewayLoad(WireStruct, frozen=True, kw_only=True):
    """This router's own admission gate for one model."""

    in_flight: Count
    queue_depth: Count
    limit: Annotated[int, msgspec.Meta(ge=0)]


class DashboardWorker(WireStruct, frozen=True, kw_only=True):
    """One worker row: its registry record, its last heartbeat's load and how old that is."""

    id: WorkerId
    url: Url
    status: WorkerStatus
    models: tuple[ModelId, ...]
    load: tuple[ModelLoad, ...] = ()
    heartbeat_age_s: float | None = None  # None: never heard from
    fresh: bool = False  # heartbeat within its TTL; a stale one means load unknown
    cooling_down: bool = False  # refused with Retry-After or failed to connect; skipped for now


class FleetSnapshot(WireStruct, frozen=True, kw_only=True):
    """The whole fleet as one router sees it at one moment."""

    workers: tuple[DashboardWorker, ...]
    capacity: CapacityView | None  # None until the capacity service has answered
    gateway: dict[ModelId, GatewayLoad]
    registry_epoch: Annotated[int, msgspec.Meta(ge=0)] = 0
    registry_seq: Count = 0
    generated_at: float = 0.0  # unix seconds, display only
