"""Fleet-page wire types: what the router streams to /dashboard (SSE, one JSON object per event):
a FleetSnapshot ("fleet") when a viewer connects, then FleetDeltas ("delta") with what changed."""

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


class FleetDelta(WireStruct, frozen=True, kw_only=True):
    """What changed since the feed's previous message; the page applies it to what it holds.

    A worker row is sent whole when anything in it but its heartbeat age changed (status, load,
    freshness, cooldown): a heartbeat that brings the same load is no news. Its age is as of
    generated_at; the page ages it by itself."""

    workers: tuple[DashboardWorker, ...] = ()  # added or changed rows
    removed: tuple[WorkerId, ...] = ()
    capacity: CapacityView | None = None  # None: unchanged (a router never forgets its view)
    gateway: dict[ModelId, GatewayLoad] = msgspec.field(default_factory=dict)  # changed gates
    registry_epoch: Annotated[int, msgspec.Meta(ge=0)] = 0
    registry_seq: Count = 0
    generated_at: float = 0.0
