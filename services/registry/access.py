"""Who may run which registry command on which record (`authorize`). Pure, no I/O.

A worker principal (its NATS user) changes and reads only records it owns; operators and the
admin API (principal OPERATOR) may do everything.
"""

from __future__ import annotations

from typing import assert_never

from schemas.registry import (
    Command,
    CommandError,
    GetRequest,
    ListRequest,
    RegisterRequest,
    RemoveRequest,
    ReplaceRequest,
    SetStatusRequest,
    UpsertRequest,
    WorkerRecord,
    WorkerStatus,
)
from services.registry.index import HEARTBEAT_LABEL, OPERATOR, RecordIndex

S = WorkerStatus
# An operator's record that a worker's upsert of the same URL may take over: nobody serves it
# (records written before owners existed are the operator's; a worker restarted after an upgrade
# gets its record back once it stopped being Ready). Records of other workers are never taken.
_CLAIMABLE = frozenset({S.PENDING, S.NOT_READY, S.FAILED})


def authorize(book: RecordIndex, principal: str, request: Command) -> CommandError | None:
    """None when principal may run request on the records as they are now, else the refusal.

    Operators may do everything. A worker principal may register (it becomes the owner), upsert a
    URL that is free, its own or an unclaimed operator's record nobody serves (_CLAIMABLE), and
    replace / set_status / remove / get only its own records; listing the fleet is not its business.
    """
    if principal == OPERATOR:
        return None
    match request:
        case RegisterRequest():
            return None
        case UpsertRequest(worker=spec):
            holder = book.url_index.get(spec.url)
            record = None if holder is None else book.records[holder]
            if record is None or record.owner == principal or _claimable(record):
                return None
            return _forbidden(f"url {spec.url} (worker {record.id})", record, principal, "url")
        case ReplaceRequest(id=worker_id) | SetStatusRequest(id=worker_id):
            return _owned(book, principal, worker_id)
        case RemoveRequest(id=worker_id) | GetRequest(id=worker_id):
            return _owned(book, principal, worker_id)
        case ListRequest():
            return CommandError(
                code="forbidden", message=f"{principal!r} may not list the fleet (operators only)"
            )
        case _:
            assert_never(request)


def _claimable(record: WorkerRecord) -> bool:
    return (
        record.owner == OPERATOR
        and record.status in _CLAIMABLE
        and record.labels.get(HEARTBEAT_LABEL) != "off"  # an operator manages it by hand
    )


def _owned(book: RecordIndex, principal: str, worker_id: str) -> CommandError | None:
    record = book.records.get(worker_id)
    if record is None or record.owner == principal:
        return None  # a missing record: the operation answers not_found itself
    return _forbidden(f"worker {worker_id}", record, principal, "id")


def _forbidden(what: str, record: WorkerRecord, principal: str, field: str) -> CommandError:
    by = f"NATS user {record.owner!r}" if record.owner else "an operator"
    return CommandError(
        code="forbidden",
        message=f"{what} belongs to {by}; {principal!r} may touch only its own records",
        field=field,
    )
