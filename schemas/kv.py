"""Prefix-cache block events (worker -> routers), sequenced like every other stream. No I/O.

A worker whose engine keeps a prefix cache publishes, per model, the blocks (schemas/prefix.py
hashes) its cache gained and lost, in order, on `<p>.kv.<principal>.<worker_id>`. Every
snapshot_interval it publishes `full=True` with everything it holds, which is how a router that
missed an event (a gap in seq) or joined late gets back in step: until then it treats that
worker's cache as unknown (empty), never as stale truth.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.base import ModelId, WireStruct, WorkerId

BlockHash = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
# 32 768 hashes of up to 19 digits stay under NATS's default 1 MiB message (about 650 KB of JSON).
MAX_BLOCKS_PER_EVENT = 32_768


class KvBlocks(WireStruct, frozen=True, kw_only=True):
    """Blocks stored into and evicted from one model's prefix cache on one worker, in order
    (evicted applies first); full=True: `stored` is the whole cache, replacing what was known."""

    worker_id: WorkerId
    model: ModelId
    stored: Annotated[tuple[BlockHash, ...], msgspec.Meta(max_length=MAX_BLOCKS_PER_EVENT)] = ()
    evicted: Annotated[tuple[BlockHash, ...], msgspec.Meta(max_length=MAX_BLOCKS_PER_EVENT)] = ()
    full: bool = False
