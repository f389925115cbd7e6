"""Registry book of record: plans each command as an Effect and commits it. Pure, no I/O.

Invariants (checked by tests/unit/test_registry_props.py after every operation):
1-2. The URL and model indexes match the records exactly (index.RecordIndex).
3. A record's revision increases by exactly 1 on every change to it and never goes back.
4. An operation never changes the book: it returns an Effect (reply, the events that describe
   the change in order, the KV writes that persist it). commit(effect) then applies it fully; the
   shell commits only once those writes succeeded, so a failed write leaves memory as it was.
5. A worker principal (its NATS user) changes and reads only records it owns (access.authorize);
   operators and the admin API (principal OPERATOR) may do everything.
The shell stamps events with contiguous seqs; the core never sees the clock or ids it did not get.
"""

from __future__ import annotations

from typing import assert_never

import msgspec

from schemas.registry import (
    Command,
    CommandOk,
    GetRequest,
    ListRequest,
    RegisterRequest,
    RemoveRequest,
    ReplaceRequest,
    SetStatusRequest,
    UpsertRequest,
    WorkerRecord,
    WorkerRegistered,
    WorkerRemoved,
    WorkerReplaced,
    WorkerSpec,
    WorkerStatus,
    WorkerStatusChanged,
)
from services.registry.access import authorize
from services.registry.effects import (
    ClaimUrl,
    DeleteRecord,
    Effect,
    PutRecord,
    ReleaseUrl,
    Write,
    refusal,
)
from services.registry.index import HEARTBEAT_LABEL as HEARTBEAT_LABEL
from services.registry.index import OPERATOR as OPERATOR
from services.registry.index import RecordIndex

S = WorkerStatus
# Allowed set_status transitions. Pending is entered only by register/replace; Failed is left
# only by re-registering (replace/upsert), which puts the worker through Pending again.
TRANSITIONS: dict[WorkerStatus, frozenset[WorkerStatus]] = {
    S.PENDING: frozenset({S.READY, S.NOT_READY, S.DRAINING, S.FAILED}),
    S.READY: frozenset({S.NOT_READY, S.DRAINING, S.FAILED}),
    S.NOT_READY: frozenset({S.READY, S.DRAINING, S.FAILED}),
    S.DRAINING: frozenset({S.READY, S.NOT_READY, S.FAILED}),
    S.FAILED: frozenset(),
}


class RegistryBook(RecordIndex):
    """The registry's book of record: every worker record, its indexes (RecordIndex) and the last
    heartbeat time of each worker."""

    def __init__(self) -> None:
        super().__init__()
        self.last_heartbeat: dict[str, float] = {}

    # ---- loading (from KV at start, after a lost CAS race or an unsure write) and commit ----

    def load(self, records: list[WorkerRecord], now: float) -> None:
        """Replace every record; every worker gets one TTL of grace before expiry can touch it."""
        self.reindex(records)
        self.grace(now)

    def grace(self, now: float) -> None:
        """Restart every liveness clock: heartbeats that could not reach us must not count."""
        self.last_heartbeat = dict.fromkeys(self.records, now)

    def commit(self, effect: Effect) -> Effect:
        """Apply a planned effect; it must have been planned on this book as it is now."""
        for write in effect.writes:
            match write:
                case PutRecord(record=new):
                    self.put(new)
                case DeleteRecord(worker_id=worker_id):
                    self.drop(worker_id)
                    self.last_heartbeat.pop(worker_id, None)
        # URL claims and releases need nothing here: url_index follows the records.
        self.last_heartbeat.update(effect.beats)
        return effect

    # ---- reads ----

    def get(self, worker_id: str) -> Effect:
        record = self.records.get(worker_id)
        if record is None:
            return refusal("not_found", f"no worker with id {worker_id!r}", "id")
        return Effect(reply=CommandOk(worker=record, applied=False))

    def list_workers(self, model: str | None = None) -> Effect:
        return Effect(reply=CommandOk(workers=self.sorted_records(model), applied=False))

    def workers(self) -> tuple[WorkerRecord, ...]:
        return self.sorted_records()

    # ---- commands ----

    def run(self, request: Command, principal: str, new_id: str, now: float) -> Effect:
        """One command from `principal`: refused unless authorize() allows it, else planned."""
        refused = authorize(self, principal, request)
        if refused is not None:
            return Effect(reply=refused)
        match request:
            case RegisterRequest(worker=spec):
                return self.register(spec, new_id, now, owner=principal)
            case UpsertRequest(worker=spec):
                return self.upsert(spec, new_id, now, owner=principal)
            case ReplaceRequest(id=worker_id, worker=spec):
                return self.replace(worker_id, spec, now)
            case SetStatusRequest(id=worker_id, status=status, expected_revision=rev, reason=why):
                return self.set_status(worker_id, status, rev, why)
            case RemoveRequest(id=worker_id, reason=why):
                return self.remove(worker_id, why)
            case GetRequest(id=worker_id):
                return self.get(worker_id)
            case ListRequest(model=model):
                return self.list_workers(model)
            case _:
                assert_never(request)

    def register(self, spec: WorkerSpec, new_id: str, now: float, owner: str = OPERATOR) -> Effect:
        """Create-only on the URL."""
        bad = _invalid_spec(spec)
        if bad is not None:
            return bad
        holder = self.url_index.get(spec.url)
        if holder is not None:
            return refusal("conflict", f"url {spec.url} is already registered as {holder}", "url")
        if new_id in self.records:
            return refusal("conflict", f"worker id {new_id!r} already exists", "id")
        record = WorkerRecord(
            id=new_id,
            url=spec.url,
            models=_dedupe(spec.models),
            status=S.PENDING,
            revision=1,
            max_running_requests=spec.max_running_requests,
            model_slots=spec.model_slots,
            labels=spec.labels,
            registered_at=now,
            owner=owner,
        )
        return Effect(
            reply=CommandOk(worker=record),
            events=(WorkerRegistered(worker=record),),
            writes=(ClaimUrl(record.url, record.id), PutRecord(record, create=True)),
            beats=((new_id, now),),
        )

    def replace(
        self, worker_id: str, spec: WorkerSpec, now: float, owner: str | None = None
    ) -> Effect:
        """Replace by id. A URL change only to a free URL. Failed/NotReady go back to Pending.
        The owner stays, unless a new one is given (a worker taking over an operator's record)."""
        old = self.records.get(worker_id)
        if old is None:
            return refusal("not_found", f"no worker with id {worker_id!r}", "id")
        bad = _invalid_spec(spec)
        if bad is not None:
            return bad
        holder = self.url_index.get(spec.url)
        if holder is not None and holder != worker_id:
            return refusal("conflict", f"url {spec.url} belongs to worker {holder}", "url")
        status = S.PENDING if old.status in (S.FAILED, S.NOT_READY) else old.status
        new = msgspec.structs.replace(
            old,
            url=spec.url,
            models=_dedupe(spec.models),
            max_running_requests=spec.max_running_requests,
            model_slots=spec.model_slots,
            labels=spec.labels,
            status=status,
            owner=old.owner if owner is None else owner,
        )
        if new == old:
            return Effect(reply=CommandOk(worker=old, applied=False))
        new = msgspec.structs.replace(new, revision=old.revision + 1)
        writes: list[Write] = []
        if old.url != new.url:
            writes.append(ClaimUrl(new.url, worker_id))
        writes.append(PutRecord(new, create=False))
        if old.url != new.url:
            writes.append(ReleaseUrl(old.url))
        return Effect(
            reply=CommandOk(worker=new),
            events=(WorkerReplaced(old=old, new=new),),
            writes=tuple(writes),
            beats=((worker_id, now),),
        )

    def upsert(self, spec: WorkerSpec, new_id: str, now: float, owner: str = OPERATOR) -> Effect:
        """Replace the record that holds the URL, else register a new one. A worker's upsert of an
        operator's record makes the worker its owner (authorize() allowed it)."""
        holder = self.url_index.get(spec.url)
        if holder is None:
            return self.register(spec, new_id, now, owner)
        return self.replace(holder, spec, now, None if owner == OPERATOR else owner)

    def set_status(
        self,
        worker_id: str,
        status: WorkerStatus,
        expected_revision: int | None = None,
        reason: str = "",
    ) -> Effect:
        old = self.records.get(worker_id)
        if old is None:
            return refusal("not_found", f"no worker with id {worker_id!r}", "id")
        if expected_revision is not None and expected_revision != old.revision:
            return refusal(
                "conflict",
                f"worker {worker_id} is at revision {old.revision}, not {expected_revision}",
                "expected_revision",
            )
        if status == old.status:
            return Effect(reply=CommandOk(worker=old, applied=False))
        if status not in TRANSITIONS[old.status]:
            return refusal(
                "invalid",
                f"cannot change status {old.status.value} -> {status.value}"
                + (" (re-register the worker instead)" if old.status == S.FAILED else ""),
                "status",
            )
        new = msgspec.structs.replace(old, status=status, revision=old.revision + 1)
        event = WorkerStatusChanged(
            worker_id=worker_id,
            old_status=old.status,
            new_status=status,
            revision=new.revision,
            reason=reason,
            worker=new,
        )
        return Effect(
            reply=CommandOk(worker=new), events=(event,), writes=(PutRecord(new, create=False),)
        )

    def remove(self, worker_id: str, reason: str = "") -> Effect:
        old = self.records.get(worker_id)
        if old is None:
            return refusal("not_found", f"no worker with id {worker_id!r}", "id")
        return Effect(
            reply=CommandOk(worker=old),
            events=(WorkerRemoved(worker=old, reason=reason),),
            writes=(DeleteRecord(worker_id), ReleaseUrl(old.url)),
        )

    # ---- liveness ----

    def heartbeat(
        self, worker_id: str, reported: WorkerStatus, now: float, principal: str = OPERATOR
    ) -> Effect:
        """A fresh heartbeat: Pending/NotReady -> Ready when the worker reports itself ready.
        Only the record's owner speaks for it (principal: the NATS user that published it)."""
        record = self.records.get(worker_id)
        if record is None:
            return refusal("not_found", f"heartbeat from unknown worker {worker_id!r}", "id")
        if record.owner != principal:
            return refusal("forbidden", f"heartbeat for {worker_id} from {principal!r}", "id")
        beat = ((worker_id, now),)
        if reported == S.READY and record.status in (S.PENDING, S.NOT_READY):
            ready = self.set_status(worker_id, S.READY, reason="heartbeat")
            return msgspec.structs.replace(ready, beats=beat)
        return Effect(reply=CommandOk(worker=record, applied=False), beats=beat)

    def expired(self, now: float, ttl_s: float) -> list[str]:
        """Ready workers silent for over ttl_s (Draining stays Draining; opt-outs skipped)."""
        return [w for w in sorted(self.records) if self._silent(w, now, ttl_s)]

    def _silent(self, worker_id: str, now: float, ttl_s: float) -> bool:
        record = self.records.get(worker_id)
        return (
            record is not None
            and record.status == S.READY
            and record.labels.get(HEARTBEAT_LABEL) != "off"
            and now - self.last_heartbeat.get(worker_id, now) > ttl_s
        )

    def expire_one(self, worker_id: str, now: float, ttl_s: float) -> Effect:
        """NotReady if still expired (a reload or a grace since expired() may have spared it)."""
        record = self.records.get(worker_id)
        if record is not None and not self._silent(worker_id, now, ttl_s):
            return Effect(reply=CommandOk(worker=record, applied=False))
        return self.set_status(worker_id, S.NOT_READY, reason="heartbeat_ttl")


def _invalid_spec(spec: WorkerSpec) -> Effect | None:
    """What msgspec cannot check field by field: model_slots may name only models served."""
    stray = sorted(set(spec.model_slots) - set(spec.models))
    if stray:
        return refusal(
            "invalid", f"model_slots names models the worker does not serve: {stray}", "model_slots"
        )
    return None


def _dedupe(models: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(models))
