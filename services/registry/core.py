"""Registry state machine: records, URL index, model index, status transitions. Pure, no I/O.

Invariants (checked by tests/unit/test_registry_props.py after every operation):
1. url_index maps each record's url to its id and nothing else (URL uniqueness).
2. model_index[m] is exactly the set of ids whose record serves m; no empty entries.
3. A record's revision increases by exactly 1 on every change to it and never goes back.
4. Every operation either changes nothing and returns an error/no-op, or applies fully and
   returns the events that describe it, in order, plus the KV writes the shell must persist.
The shell stamps events with contiguous seqs; the core never sees the clock or ids it did not get.
"""

from __future__ import annotations

import hashlib

import msgspec

from schemas.registry import (
    CommandError,
    CommandOk,
    CommandReply,
    ErrorCode,
    RegistryEvent,
    WorkerRecord,
    WorkerRegistered,
    WorkerRemoved,
    WorkerReplaced,
    WorkerSpec,
    WorkerStatus,
    WorkerStatusChanged,
)

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
# A worker labelled this way is never expired for missing heartbeats (an external server that an
# operator registered by hand and manages itself).
HEARTBEAT_LABEL = "switchboard.heartbeat"


def url_key(url: str) -> str:
    """KV key for the URL index (URLs hold characters KV keys do not allow)."""
    return "urls." + hashlib.sha256(url.encode()).hexdigest()[:40]


def record_key(worker_id: str) -> str:
    return f"workers.{worker_id}"


class PutRecord(msgspec.Struct, frozen=True):
    record: WorkerRecord
    create: bool  # True: the key must not exist yet (KV create); False: update at the cached rev


class DeleteRecord(msgspec.Struct, frozen=True):
    worker_id: str


class ClaimUrl(msgspec.Struct, frozen=True):
    url: str
    worker_id: str  # KV create: fails if another worker holds the URL


class ReleaseUrl(msgspec.Struct, frozen=True):
    url: str


Write = PutRecord | DeleteRecord | ClaimUrl | ReleaseUrl


class Outcome(msgspec.Struct, frozen=True):
    reply: CommandReply
    events: tuple[RegistryEvent, ...] = ()
    writes: tuple[Write, ...] = ()


def _error(code: ErrorCode, message: str, field: str | None = None) -> Outcome:
    return Outcome(reply=CommandError(code=code, message=message, field=field))


class RegistryState:
    """All worker records plus their indexes and the last heartbeat time of each worker."""

    def __init__(self) -> None:
        self.records: dict[str, WorkerRecord] = {}
        self.url_index: dict[str, str] = {}
        self.model_index: dict[str, set[str]] = {}
        self.last_heartbeat: dict[str, float] = {}

    # ---- loading (from KV at start or after a lost CAS race) ----

    def load(self, records: list[WorkerRecord], now: float) -> None:
        """Replace all state; every worker gets one TTL of grace before expiry can touch it."""
        self.records, self.url_index, self.model_index = {}, {}, {}
        self.last_heartbeat = {}
        for record in records:
            self._index(record)
            self.last_heartbeat[record.id] = now

    def _index(self, record: WorkerRecord) -> None:
        self.records[record.id] = record
        self.url_index[record.url] = record.id
        for model in record.models:
            self.model_index.setdefault(model, set()).add(record.id)

    def _unindex(self, record: WorkerRecord) -> None:
        del self.records[record.id]
        if self.url_index.get(record.url) == record.id:
            del self.url_index[record.url]
        for model in record.models:
            self._drop_model(model, record.id)

    def _drop_model(self, model: str, worker_id: str) -> None:
        ids = self.model_index.get(model)
        if ids is not None:
            ids.discard(worker_id)
            if not ids:
                del self.model_index[model]

    def _swap(self, old: WorkerRecord, new: WorkerRecord) -> None:
        """Replace in place: the model index is diffed so a kept model is never briefly absent."""
        self.records[new.id] = new
        if old.url != new.url:
            del self.url_index[old.url]
            self.url_index[new.url] = new.id
        for model in set(new.models) - set(old.models):
            self.model_index.setdefault(model, set()).add(new.id)
        for model in set(old.models) - set(new.models):
            self._drop_model(model, old.id)

    # ---- reads ----

    def get(self, worker_id: str) -> Outcome:
        record = self.records.get(worker_id)
        if record is None:
            return _error("not_found", f"no worker with id {worker_id!r}", "id")
        return Outcome(reply=CommandOk(worker=record, applied=False))

    def list_workers(self, model: str | None = None) -> Outcome:
        ids = self.records if model is None else self.model_index.get(model, set())
        workers = tuple(sorted((self.records[i] for i in ids), key=lambda r: r.id))
        return Outcome(reply=CommandOk(workers=workers, applied=False))

    def workers(self) -> tuple[WorkerRecord, ...]:
        return tuple(sorted(self.records.values(), key=lambda r: r.id))

    # ---- commands ----

    def register(self, spec: WorkerSpec, new_id: str, now: float) -> Outcome:
        """Create-only on the URL."""
        owner = self.url_index.get(spec.url)
        if owner is not None:
            return _error("conflict", f"url {spec.url} is already registered as {owner}", "url")
        if new_id in self.records:
            return _error("conflict", f"worker id {new_id!r} already exists", "id")
        record = WorkerRecord(
            id=new_id,
            url=spec.url,
            models=_dedupe(spec.models),
            status=S.PENDING,
            revision=1,
            max_running_requests=spec.max_running_requests,
            labels=spec.labels,
            registered_at=now,
        )
        self._index(record)
        self.last_heartbeat[new_id] = now
        return Outcome(
            reply=CommandOk(worker=record),
            events=(WorkerRegistered(worker=record),),
            writes=(ClaimUrl(record.url, record.id), PutRecord(record, create=True)),
        )

    def replace(self, worker_id: str, spec: WorkerSpec, now: float) -> Outcome:
        """Replace by id. A URL change only to a free URL. Failed/NotReady go back to Pending."""
        old = self.records.get(worker_id)
        if old is None:
            return _error("not_found", f"no worker with id {worker_id!r}", "id")
        owner = self.url_index.get(spec.url)
        if owner is not None and owner != worker_id:
            return _error("conflict", f"url {spec.url} belongs to worker {owner}", "url")
        status = S.PENDING if old.status in (S.FAILED, S.NOT_READY) else old.status
        new = msgspec.structs.replace(
            old,
            url=spec.url,
            models=_dedupe(spec.models),
            max_running_requests=spec.max_running_requests,
            labels=spec.labels,
            status=status,
        )
        if new == old:
            return Outcome(reply=CommandOk(worker=old, applied=False))
        new = msgspec.structs.replace(new, revision=old.revision + 1)
        self._swap(old, new)
        self.last_heartbeat[worker_id] = now
        writes: list[Write] = []
        if old.url != new.url:
            writes.append(ClaimUrl(new.url, worker_id))
        writes.append(PutRecord(new, create=False))
        if old.url != new.url:
            writes.append(ReleaseUrl(old.url))
        return Outcome(
            reply=CommandOk(worker=new),
            events=(WorkerReplaced(old=old, new=new),),
            writes=tuple(writes),
        )

    def upsert(self, spec: WorkerSpec, new_id: str, now: float) -> Outcome:
        """Replace the record that owns the URL, else register a new one."""
        owner = self.url_index.get(spec.url)
        if owner is None:
            return self.register(spec, new_id, now)
        return self.replace(owner, spec, now)

    def set_status(
        self,
        worker_id: str,
        status: WorkerStatus,
        expected_revision: int | None = None,
        reason: str = "",
    ) -> Outcome:
        old = self.records.get(worker_id)
        if old is None:
            return _error("not_found", f"no worker with id {worker_id!r}", "id")
        if expected_revision is not None and expected_revision != old.revision:
            return _error(
                "conflict",
                f"worker {worker_id} is at revision {old.revision}, not {expected_revision}",
                "expected_revision",
            )
        if status == old.status:
            return Outcome(reply=CommandOk(worker=old, applied=False))
        if status not in TRANSITIONS[old.status]:
            return _error(
                "invalid",
                f"cannot change status {old.status.value} -> {status.value}"
                + (" (re-register the worker instead)" if old.status == S.FAILED else ""),
                "status",
            )
        new = msgspec.structs.replace(old, status=status, revision=old.revision + 1)
        self.records[worker_id] = new
        event = WorkerStatusChanged(
            worker_id=worker_id,
            old_status=old.status,
            new_status=status,
            revision=new.revision,
            reason=reason,
            worker=new,
        )
        return Outcome(
            reply=CommandOk(worker=new), events=(event,), writes=(PutRecord(new, create=False),)
        )

    def remove(self, worker_id: str, reason: str = "") -> Outcome:
        old = self.records.get(worker_id)
        if old is None:
            return _error("not_found", f"no worker with id {worker_id!r}", "id")
        self._unindex(old)
        self.last_heartbeat.pop(worker_id, None)
        return Outcome(
            reply=CommandOk(worker=old),
            events=(WorkerRemoved(worker=old, reason=reason),),
            writes=(DeleteRecord(worker_id), ReleaseUrl(old.url)),
        )

    # ---- liveness ----

    def heartbeat(self, worker_id: str, reported: WorkerStatus, now: float) -> Outcome:
        """A fresh heartbeat: Pending/NotReady -> Ready when the worker reports itself ready."""
        record = self.records.get(worker_id)
        if record is None:
            return _error("not_found", f"heartbeat from unknown worker {worker_id!r}", "id")
        self.last_heartbeat[worker_id] = now
        if reported == S.READY and record.status in (S.PENDING, S.NOT_READY):
            return self.set_status(worker_id, S.READY, reason="heartbeat")
        return Outcome(reply=CommandOk(worker=record, applied=False))

    def expired(self, now: float, ttl_s: float) -> list[str]:
        """Ready workers silent for over ttl_s (Draining stays Draining; opt-outs skipped)."""
        return [
            worker_id
            for worker_id, record in sorted(self.records.items())
            if record.status == S.READY
            and record.labels.get(HEARTBEAT_LABEL) != "off"
            and now - self.last_heartbeat.get(worker_id, now) > ttl_s
        ]

    def expire_one(self, worker_id: str) -> Outcome:
        return self.set_status(worker_id, S.NOT_READY, reason="heartbeat_ttl")


def _dedupe(models: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(models))
