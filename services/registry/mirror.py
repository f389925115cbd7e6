"""Registry mirror for followers (capacity, router): apply events in seq order, re-snapshot on loss.

Pure, no I/O. Invariants:
- `records` equals the registry's records as of (epoch, seq) whenever `syncing` is False.
- While syncing, events are buffered (bounded) and replayed after the snapshot if newer than it.
- Every way of losing events (gap, new epoch, beacon ahead, reconnect, slow consumer, buffer
  overflow) leads to exactly one Resync until a snapshot arrives.
- `take_changes()` names the ids an event added, changed or removed since it was last called,
  or None when a snapshot (or more changes than max_buffer) may have changed any of them, so a
  follower can apply one event as one change instead of rebuilding from every record.
"""

from __future__ import annotations

import msgspec

from schemas.base import Envelope
from schemas.registry import (
    RegistryBeacon,
    RegistryEvent,
    RegistrySnapshot,
    WorkerRecord,
    WorkerRegistered,
    WorkerRemoved,
    WorkerReplaced,
    WorkerStatusChanged,
)
from services.common.seq import Duplicate, Gap, InOrder, NewEpoch, SequenceTracker

SOURCE = "registry"


class Applied(msgspec.Struct, frozen=True):
    """The mirror changed."""


class Ignored(msgspec.Struct, frozen=True):
    """Nothing to do (duplicate, beacon in step, or buffered while syncing)."""


class Resync(msgspec.Struct, frozen=True):
    """Request a snapshot now; reason is a metric label (gap, new_epoch, beacon, ...)."""

    reason: str


Step = Applied | Ignored | Resync


class RegistryMirror:
    def __init__(self, max_buffer: int = 10_000) -> None:
        self.records: dict[str, WorkerRecord] = {}
        self.tracker = SequenceTracker()
        self.syncing = True  # nothing is known until the first snapshot
        self.buffer: list[Envelope[RegistryEvent]] = []
        self.max_buffer = max_buffer
        self.gaps = 0  # sequence gaps seen (a metric)
        self.changed: set[str] | None = None  # see take_changes(); None: anything may have

    @property
    def position(self) -> tuple[int, int]:
        return self.tracker.position(SOURCE) or (0, 0)

    def take_changes(self) -> set[str] | None:
        """Ids added, changed or removed since the last call; None: any may have (a snapshot)."""
        changed, self.changed = self.changed, set()
        return changed

    def _touch(self, worker_id: str) -> None:
        if self.changed is not None:
            self.changed.add(worker_id)
            if len(self.changed) > self.max_buffer:  # nobody takes them: stay bounded
                self.changed = None

    def lost(self, reason: str) -> Resync:
        """The transport may have dropped events (reconnect, slow consumer, checkpoint)."""
        self.syncing = True
        return Resync(reason)

    def observe(self, env: Envelope[RegistryEvent]) -> Step:
        if self.syncing:
            if not isinstance(env.body, RegistryBeacon):
                if len(self.buffer) >= self.max_buffer:
                    self.buffer.clear()  # the snapshot will cover them; keep memory bounded
                self.buffer.append(env)
            return Ignored()
        if isinstance(env.body, RegistryBeacon):
            verdict = self.tracker.observe_beacon(SOURCE, env.epoch, env.body.last_seq)
        else:
            verdict = self.tracker.observe(SOURCE, env.epoch, env.seq)
        match verdict:
            case InOrder():
                return Ignored() if isinstance(env.body, RegistryBeacon) else self._apply(env.body)
            case Duplicate():
                return Ignored()
            case Gap():
                self.gaps += 1
                reason = "beacon" if isinstance(env.body, RegistryBeacon) else "gap"
            case NewEpoch():
                reason = "new_epoch"
        if not isinstance(env.body, RegistryBeacon):
            self.buffer.append(env)
        return self.lost(reason)

    def apply_snapshot(self, snap: RegistrySnapshot) -> Step:
        """Adopt the snapshot, then replay buffered events that continue it in order.

        A buffered event that still does not follow the snapshot is dropped, not re-buffered: the
        snapshot is the registry's truth, and a real loss shows again at the next event or beacon
        (re-buffering a bogus far-ahead event would re-snapshot forever).
        """
        self.records = {w.id: w for w in snap.workers}
        self.changed = None
        self.tracker.reset(SOURCE, snap.epoch, snap.seq)
        self.syncing = False
        buffered, self.buffer = self.buffer, []
        for env in sorted(buffered, key=lambda e: (e.epoch, e.seq)):
            if env.epoch != snap.epoch:
                continue
            verdict = self.tracker.observe(SOURCE, env.epoch, env.seq)
            if isinstance(verdict, InOrder):
                self._apply(env.body)
            elif not isinstance(verdict, Duplicate):
                break
        return Applied()

    def _apply(self, event: RegistryEvent) -> Step:
        match event:
            case WorkerRegistered(worker=record) | WorkerReplaced(new=record):
                self.records[record.id] = record
                self._touch(record.id)
            case WorkerStatusChanged(worker=WorkerRecord() as record):
                self.records[record.id] = record
                self._touch(record.id)
            case WorkerStatusChanged(worker_id=worker_id, new_status=status, revision=rev):
                old = self.records.get(worker_id)
                if old is not None:
                    self.records[worker_id] = msgspec.structs.replace(
                        old, status=status, revision=rev
                    )
                    self._touch(worker_id)
            case WorkerRemoved(worker=record):
                self.records.pop(record.id, None)
                self._touch(record.id)
        return Applied()
