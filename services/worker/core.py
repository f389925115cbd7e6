"""Worker decisions, pure: how a worker puts its own registry record right. No I/O."""

from __future__ import annotations

from typing import Literal

from schemas.registry import WorkerRecord, WorkerSpec, WorkerStatus

Repair = Literal["register", "replace", "drain"]


def repair(record: WorkerRecord | None, spec: WorkerSpec, chosen: WorkerStatus) -> Repair | None:
    """What puts our record right when someone else changed it (pure; None: nothing to do).

    The worker knows what it serves: a missing record is registered again; a changed spec, or
    Failed (left only through Pending), is replaced by ours. Its own Draining is restored. It never
    undoes a status it did not choose otherwise: an operator's drain stays, and Pending/NotReady
    are its heartbeats' business (a `ready` heartbeat makes them Ready).
    """
    if record is None:
        return "register"
    ours = WorkerSpec(
        url=record.url,
        models=record.models,
        max_running_requests=record.max_running_requests,
        labels=record.labels,
    )
    if ours != spec or record.status == WorkerStatus.FAILED:
        return "replace"
    if chosen == WorkerStatus.DRAINING and record.status != WorkerStatus.DRAINING:
        return "drain"
    return None
