"""What a replica choice answers: a replica, or why there is none (a refusal). Pure, no I/O."""

from __future__ import annotations

import msgspec


class Choice(msgspec.Struct, frozen=True):
    worker_id: str
    url: str
    score: int  # its busy count when chosen
    fresh: bool
    estimate_s: float | None = None  # the cost policy's estimated time to first token


class UnknownModel(msgspec.Struct, frozen=True):
    model: str


class NoReplica(msgspec.Struct, frozen=True):
    """The model exists but no replica can take the request now."""

    model: str
    pending: bool  # some worker for it is Pending (starting): worth retrying soon
    reason: str


NoChoice = UnknownModel | NoReplica  # why choose() found no replica: a refusal for the client
