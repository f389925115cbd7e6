"""Registry state machine: records, URL index, model index, status transitions. Pure, no I/O.

Invariants (checked by tests/unit/test_registry_props.py after every operation):
1. url_index maps each record's url to its id and nothing else (URL uniqueness).
2. model_index[m] is exactly the set of ids whose record serves m; no empty entries.
3. A record's revision increases by exactly 1 on every change to it and never goes back.
4. An operation never changes the state: it returns an Outcome (reply, the events that describe
   the change in order, the KV writes that persist it). commit(outcome) then applies it fully; the
   shell commits only once those writes succeeded, so a failed write leaves memory as it was.
5. A worker principal (its NATS user) changes and reads only records it owns (`authorize`);
   operators and the admin API (principal OPERATOR) may do everything.
The shell stamps events with contiguous seqs; the core never sees the clock or ids it did not get.
"""

from __future__ import annotations

import hashlib

import msgspec

from schemas.registry import (
    Command,
    CommandError,
    CommandOk,
    CommandReply,
    ErrorCode,
    GetRequest,
    ListRequest,
    RegisterRequest,
    RegistryEvent,
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
# The principal of operators and the admin API, and the owner of the records they create.
OPERATOR = ""
# An operator's record that a worker's upsert of the same URL may take over: nobody serves it
# (records written before owners existed are the operator's; a worker restarted after an upgrade
# gets its record back once it stopped being Ready). Records of other workers are never taken.
_CLAIMABLE = frozenset({S.PENDING, S.NOT_READY, S.FAILED})


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
    # (worker id, time): liveness clocks this outcome (re)starts when committed
    beats: tuple[tuple[str, float], ...] = ()


def _error(code: ErrorCode, message: str, field: str | None = None) -> Outcome:
    return Outcome(reply=CommandError(code=code, message=message, field=field))


class RegistryState:
    """All worker records plus their indexes and the last heartbeat time of each worker."""

    def __init__(self) -> None:
        self.records: dict[str, WorkerRecord] = {}
        self.url_index: dict[str, str] = {}
        self.model_index: dict[str, set[str]] = {}
        self.last_heartbeat: dict[str, float] = {}

    # ---- loading (from KV at start, after a lost CAS race or an unsure write) and commit ----

    def load(self, records: list[WorkerRecord], now: float) -> None:
        """Replace all state; every worker gets one TTL of grace before expiry can touch it."""
        self.records, self.url_index, self.model_index = {}, {}, {}
        for record in records:
            self._index(record)
        self.grace(now)

    def grace(self, now: float) -> None:
        """Restart every liveness clock: heartbeats that could not reach us must not count."""
        self.last_heartbeat = dict.fromkeys(self.records, now)

    def commit(self, outcome: Outcome) -> Outcome:
        """Apply a planned outcome; it must have been planned on this state as it is now."""
        for write in outcome.writes:
            match write:
                case PutRecord(record=new):
                    old = self.records.get(new.id)
                    if old is None:
                        self._index(new)
                    else:
                        self._swap(old, new)
                case DeleteRecord(worker_id=worker_id):
                    self._unindex(self.records[worker_id])
                    self.last_heartbeat.pop(worker_id, None)
        # URL claims and releases need nothing here: url_index follows the records.
        self.last_heartbeat.update(outcome.beats)
        return outcome

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

    def run(self, request: Command, principal: str, new_id: str, now: float) -> Outcome:
        """One command from `principal`: refused unless authorize() allows it, else planned."""
        refused = authorize(self, principal, request)
        if refused is not None:
            return Outcome(reply=refused)
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
        raise TypeError(f"unhandled request {request!r}")

    def register(self, spec: WorkerSpec, new_id: str, now: float, owner: str = OPERATOR) -> Outcome:
        """Create-only on the URL."""
        holder = self.url_index.get(spec.url)
        if holder is not None:
            return _error("conflict", f"url {spec.url} is already registered as {holder}", "url")
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
            owner=owner,
        )
        return Outcome(
            reply=CommandOk(worker=record),
            events=(WorkerRegistered(worker=record),),
            writes=(ClaimUrl(record.url, record.id), PutRecord(record, create=True)),
            beats=((new_id, now),),
        )

    def replace(
        self, worker_id: str, spec: WorkerSpec, now: float, owner: str | None = None
    ) -> Outcome:
        """Replace by id. A URL change only to a free URL. Failed/NotReady go back to Pending.
        The owner stays, unless a new one is given (a worker taking over an operator's record)."""
        old = self.records.get(worker_id)
        if old is None:
            return _error("not_found", f"no worker with id {worker_id!r}", "id")
        holder = self.url_index.get(spec.url)
        if holder is not None and holder != worker_id:
            return _error("conflict", f"url {spec.url} belongs to worker {holder}", "url")
        status = S.PENDING if old.status in (S.FAILED, S.NOT_READY) else old.status
        new = msgspec.structs.replace(
            old,
            url=spec.url,
            models=_dedupe(spec.models),
            max_running_requests=spec.max_running_requests,
            labels=spec.labels,
            status=status,
            owner=old.owner if owner is None else owner,
        )
        if new == old:
            return Outcome(reply=CommandOk(worker=old, applied=False))
        new = msgspec.structs.replace(new, revision=old.revision + 1)
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
            beats=((worker_id, now),),
        )

    def upsert(self, spec: WorkerSpec, new_id: str, now: float, owner: str = OPERATOR) -> Outcome:
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
        return Outcome(
            reply=CommandOk(worker=old),
            events=(WorkerRemoved(worker=old, reason=reason),),
            writes=(DeleteRecord(worker_id), ReleaseUrl(old.url)),
        )

    # ---- liveness ----

    def heartbeat(
        self, worker_id: str, reported: WorkerStatus, now: float, principal: str = OPERATOR
    ) -> Outcome:
        """A fresh heartbeat: Pending/NotReady -> Ready when the worker reports itself ready.
        Only the record's owner speaks for it (principal: the NATS user that published it)."""
        record = self.records.get(worker_id)
        if record is None:
            return _error("not_found", f"heartbeat from unknown worker {worker_id!r}", "id")
        if record.owner != principal:
            return _error("forbidden", f"heartbeat for {worker_id} from {principal!r}", "id")
        beat = ((worker_id, now),)
        if reported == S.READY and record.status in (S.PENDING, S.NOT_READY):
            ready = self.set_status(worker_id, S.READY, reason="heartbeat")
            return msgspec.structs.replace(ready, beats=beat)
        return Outcome(reply=CommandOk(worker=record, applied=False), beats=beat)

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

    def expire_one(self, worker_id: str, now: float, ttl_s: float) -> Outcome:
        """NotReady if still expired (a reload or a grace since expired() may have spared it)."""
        record = self.records.get(worker_id)
        if record is not None and not self._silent(worker_id, now, ttl_s):
            return Outcome(reply=CommandOk(worker=record, applied=False))
        return self.set_status(worker_id, S.NOT_READY, reason="heartbeat_ttl")


def authorize(state: RegistryState, principal: str, request: Command) -> CommandError | None:
    """None when principal may run request on state as it is now, else the refusal.

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
            holder = state.url_index.get(spec.url)
            record = None if holder is None else state.records[holder]
            if record is None or record.owner == principal or _claimable(record):
                return None
            return _forbidden(f"url {spec.url} (worker {record.id})", record, principal, "url")
        case ReplaceRequest(id=worker_id) | SetStatusRequest(id=worker_id):
            return _owned(state, principal, worker_id)
        case RemoveRequest(id=worker_id) | GetRequest(id=worker_id):
            return _owned(state, principal, worker_id)
        case ListRequest():
            return CommandError(
                code="forbidden", message=f"{principal!r} may not list the fleet (operators only)"
            )
    raise TypeError(f"unhandled request {request!r}")


def _claimable(record: WorkerRecord) -> bool:
    return (
        record.owner == OPERATOR
        and record.status in _CLAIMABLE
        and record.labels.get(HEARTBEAT_LABEL) != "off"  # an operator manages it by hand
    )


def _owned(state: RegistryState, principal: str, worker_id: str) -> CommandError | None:
    record = state.records.get(worker_id)
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


def _dedupe(models: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(models))
