"""Capacity wire types: fleet and per-model capacity with the tier it came from. No I/O."""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from schemas.base import Count, ModelId, Seq, WireStruct

MAX_CAPACITY = 65535


class CapacitySource(enum.Enum):
    """Where a capacity number came from, in precedence order."""

    OVERRIDE = "override"
    WORKER_REPORTED = "worker_reported"
    MIXED = "mixed"
    LEGACY_FALLBACK = "legacy_fallback"


class ModelCapacity(WireStruct, frozen=True, kw_only=True):
    """Concurrent requests the healthy workers (of one model, or of the fleet) can run."""

    capacity: Annotated[int, msgspec.Meta(ge=0, le=MAX_CAPACITY)]
    source: CapacitySource
    workers_available: Count


class CapacityView(WireStruct, frozen=True, kw_only=True):
    """Fleet capacity plus one entry per model; registry_seq is the last registry event applied."""

    fleet: ModelCapacity
    models: dict[ModelId, ModelCapacity]
    registry_epoch: Annotated[int, msgspec.Meta(ge=0)] = 0
    registry_seq: Seq = 0
