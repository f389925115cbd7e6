"""Registry wire types: worker records, events, snapshot, commands and their replies. No I/O."""

from __future__ import annotations

import enum
from typing import Annotated, ClassVar, Literal, get_args

import msgspec

from schemas.base import Count, Event, ModelId, Seq, WireStruct, WorkerId

Url = Annotated[str, msgspec.Meta(min_length=8, max_length=2048, pattern=r"^https?://[^\s/]+")]
LabelMap = dict[
    Annotated[str, msgspec.Meta(min_length=1, max_length=63)],
    Annotated[str, msgspec.Meta(max_length=256)],
]
Slots = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class WorkerStatus(enum.Enum):
    """Lifecycle of a worker: Pending -> Ready <-> NotReady, Draining, Failed."""

    PENDING = "pending"
    READY = "ready"
    NOT_READY = "not_ready"
    DRAINING = "draining"
    FAILED = "failed"


class WorkerSpec(WireStruct, frozen=True, kw_only=True):
    """What a caller asks the registry to record about a worker (the record minus bookkeeping)."""

    url: Url
    models: tuple[ModelId, ...]
    # The worker's total: how many requests it runs at once, all models together.
    max_running_requests: Slots | None = None
    # Per model, how many of its requests it runs at once (a model absent: unknown, see
    # docs/capacity.md). Every key must be one of `models`.
    model_slots: dict[ModelId, Slots] = msgspec.field(default_factory=dict)
    labels: LabelMap = msgspec.field(default_factory=dict)


class WorkerRecord(WireStruct, frozen=True, kw_only=True):
    """A worker as the registry knows it; revision increases by 1 on every change to it."""

    id: WorkerId
    url: Url
    models: tuple[ModelId, ...]
    status: WorkerStatus
    revision: Annotated[int, msgspec.Meta(ge=1)]
    max_running_requests: Slots | None = None
    model_slots: dict[ModelId, Slots] = msgspec.field(default_factory=dict)
    labels: LabelMap = msgspec.field(default_factory=dict)
    registered_at: float = 0.0
    # The NATS user (principal) of the worker that registered it; "" = an operator or the admin
    # API (and every record written before owners existed). Only its owner's heartbeats count.
    owner: Annotated[str, msgspec.Meta(max_length=256)] = ""


class WorkerRegistered(Event, frozen=True, kw_only=True, tag="worker.registered"):
    """A new worker record was created (status Pending)."""

    worker: WorkerRecord


class WorkerReplaced(Event, frozen=True, kw_only=True, tag="worker.replaced"):
    """A record was replaced in place by id: same id, new url/models/limits, revision + 1."""

    old: WorkerRecord
    new: WorkerRecord


class WorkerStatusChanged(Event, frozen=True, kw_only=True, tag="worker.status_changed"):
    """A worker's status changed; worker is the record after the change."""

    worker_id: WorkerId
    old_status: WorkerStatus
    new_status: WorkerStatus
    revision: Annotated[int, msgspec.Meta(ge=1)]
    reason: str = ""
    worker: WorkerRecord | None = None


class WorkerRemoved(Event, frozen=True, kw_only=True, tag="worker.removed"):
    """A worker record was deleted; worker is the record as it was."""

    worker: WorkerRecord
    reason: str = ""


class RegistryBeacon(Event, frozen=True, kw_only=True, tag="registry.beacon"):
    """Periodic: the registry's last event seq, so a consumer notices a lost *last* event."""

    last_seq: Seq
    workers: Count = 0


RegistryEvent = (
    WorkerRegistered | WorkerReplaced | WorkerStatusChanged | WorkerRemoved | RegistryBeacon
)


class RegistrySnapshot(WireStruct, frozen=True, kw_only=True):
    """All records as of event `seq` of `epoch` (the last event the snapshot includes)."""

    epoch: Annotated[int, msgspec.Meta(ge=0)]
    seq: Seq
    workers: tuple[WorkerRecord, ...]
    # worker id -> when this registry process last accepted a heartbeat from it (unix seconds):
    # how long ago a dead worker was last heard, for `switchboard status`; empty after a restart
    # until heartbeats come in.
    heard_at: dict[WorkerId, float] = msgspec.field(default_factory=dict)


# ---- commands (request/reply on <prefix>.registry.cmd.<op>; workers: .registry.wcmd.<p>.<op>) ----
# Each request type names its op in a ClassVar, not a msgspec tag: a tag would be encoded into the
# body, and on the wire the op travels in the subject while the body is the bare request.


class RegisterRequest(WireStruct, frozen=True, kw_only=True):
    """Create-only: a URL that is already registered is a conflict."""

    op: ClassVar[str] = "register"
    worker: WorkerSpec


class ReplaceRequest(WireStruct, frozen=True, kw_only=True):
    """Replace the record with this id; a URL change only to a URL nobody else owns."""

    op: ClassVar[str] = "replace"
    id: WorkerId
    worker: WorkerSpec


class UpsertRequest(WireStruct, frozen=True, kw_only=True):
    """Replace the record owning this URL if there is one, else register."""

    op: ClassVar[str] = "upsert"
    worker: WorkerSpec


class SetStatusRequest(WireStruct, frozen=True, kw_only=True):
    """Change a status; with expected_revision the change applies only at that revision."""

    op: ClassVar[str] = "set_status"
    id: WorkerId
    status: WorkerStatus
    expected_revision: Annotated[int, msgspec.Meta(ge=1)] | None = None
    reason: str = ""


class RemoveRequest(WireStruct, frozen=True, kw_only=True):
    """Delete the record with this id."""

    op: ClassVar[str] = "remove"
    id: WorkerId
    reason: str = ""


class GetRequest(WireStruct, frozen=True, kw_only=True):
    """Read one record by id."""

    op: ClassVar[str] = "get"
    id: WorkerId


class ListRequest(WireStruct, frozen=True, kw_only=True):
    """Read all records, optionally only those serving `model`."""

    op: ClassVar[str] = "list"
    model: ModelId | None = None


# Every registry command: the registry's core handles each by `match` on this union.
Command = (
    RegisterRequest
    | ReplaceRequest
    | UpsertRequest
    | SetStatusRequest
    | RemoveRequest
    | GetRequest
    | ListRequest
)
# The one table of commands, op -> request type, derived from the union: the subjects
# (schemas.subjects), the client's op lookup and the registry's decoding all come from it.
COMMANDS: dict[str, type[Command]] = {t.op: t for t in get_args(Command)}


# forbidden: a worker's credential asked to touch a record that is not its own.
ErrorCode = Literal["conflict", "not_found", "invalid", "unavailable", "forbidden"]


class CommandOk(WireStruct, frozen=True, kw_only=True, tag_field="result", tag="ok"):
    """A command succeeded; applied is False when it was a no-op (upsert of an equal record)."""

    worker: WorkerRecord | None = None
    workers: tuple[WorkerRecord, ...] = ()
    applied: bool = True


class CommandError(WireStruct, frozen=True, kw_only=True, tag_field="result", tag="error"):
    """A command was refused; nothing changed."""

    code: ErrorCode
    message: str
    field: str | None = None


CommandReply = CommandOk | CommandError
