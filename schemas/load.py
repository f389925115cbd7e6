"""Load heartbeat wire types (worker -> all, full state each time, latest wins). No I/O."""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.base import Count, ModelId, WireStruct, WorkerId
from schemas.registry import Url, WorkerStatus


class ModelLoad(WireStruct, frozen=True, kw_only=True):
    """One model's admission state on one worker."""

    id: ModelId
    in_flight: Count
    queue_depth: Count
    max_in_flight: Annotated[int, msgspec.Meta(ge=1)]
    max_queue_depth: Count
    # What the router's cost estimate needs, measured by the worker (None until measured):
    # seconds a request holds a slot (recent mean), prompt tokens prefilled per second (recent
    # mean), and its prefix cache's lookups and hits (counters since start; 0/0: no cache).
    service_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    prefill_tokens_per_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    prefix_lookups: Count = 0
    prefix_hits: Count = 0


class WorkerLoad(WireStruct, frozen=True, kw_only=True):
    """A worker's full load state; published on change (debounced) and every heartbeat interval."""

    worker_id: WorkerId
    url: Url
    models: tuple[ModelLoad, ...]
    status: WorkerStatus
    tokens_per_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    heartbeat_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
