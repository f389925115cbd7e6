"""Admission control: slots plus a bounded priority queue with a max wait. Pure, no I/O.

Used by the worker (per model, limit = the engine's batch) and the router's gateway admission
(per model, limit = the model's fleet capacity). Invariants:
- in_flight <= max_in_flight and len(queue) <= max_queue_depth, except that lowering the limit
  never evicts a running request (in_flight drains down to it).
- A ticket is in exactly one place: running, queued, or gone; release()/leave() of an unknown
  ticket is a no-op, so a double release can never free someone else's slot.
- Queued tickets are admitted highest priority first, FIFO within a priority.
- Retry-After comes from measured service time (EWMA of request durations), not a constant.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from schemas.load import ModelLoad

RejectReason = Literal["queue_full", "timeout", "draining"]
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 60


class AdmissionLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_in_flight: int
    max_queue_depth: int
    max_wait_s: float


class Admitted(msgspec.Struct, frozen=True):
    ticket: int


class Queued(msgspec.Struct, frozen=True):
    ticket: int
    position: int  # 1 = next to run


class Busy(msgspec.Struct, frozen=True):
    """Refused: tell the client when trying again makes sense."""

    reason: RejectReason
    retry_after_s: int


# Admission's answer to one request ("Decision" is the router's word: where a request goes).
Verdict = Admitted | Queued | Busy


class Admission:
    """Slots and a bounded FIFO queue for one model."""

    def __init__(self, limits: AdmissionLimits, initial_service_s: float = 1.0) -> None:
        self.limits = limits
        self.running: set[int] = set()
        self.queue: dict[int, tuple[int, float]] = {}  # ticket -> (priority, enqueued_at)
        self.draining = False
        self.mean_service_s = initial_service_s
        self._next = 0

    @property
    def in_flight(self) -> int:
        return len(self.running)

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    def retry_after_s(self) -> int:
        """Roughly when a slot frees for a newcomer: mean service time x queue rounds ahead."""
        rounds = (self.queue_depth + 1) / max(self.limits.max_in_flight, 1)
        estimate = math.ceil(self.mean_service_s * rounds)
        return min(max(estimate, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)

    def request(self, now: float, priority: int = 0) -> Verdict:
        if self.draining:
            return Busy("draining", self.retry_after_s())
        self._next += 1
        ticket = self._next
        if self.in_flight < self.limits.max_in_flight and not self.queue:
            self.running.add(ticket)
            return Admitted(ticket)
        if self.queue_depth < self.limits.max_queue_depth:
            self.queue[ticket] = (priority, now)
            ahead = sum(1 for p, _ in self.queue.values() if p >= priority)
            return Queued(ticket, ahead)
        return Busy("queue_full", self.retry_after_s())

    def set_limit(self, max_in_flight: int) -> list[int]:
        """Change the slot count (capacity moved); return tickets admitted by a raise."""
        self.limits = msgspec.structs.replace(self.limits, max_in_flight=max(max_in_flight, 0))
        return self._promote()

    def release(self, ticket: int, duration_s: float | None = None) -> list[int]:
        """A running ticket finished, failed or lost its client; return the tickets now admitted."""
        if ticket not in self.running:
            return []
        self.running.discard(ticket)
        if duration_s is not None:
            # EWMA: recent requests weigh most, one outlier does not swing Retry-After.
            self.mean_service_s = 0.8 * self.mean_service_s + 0.2 * max(duration_s, 0.0)
        return self._promote()

    def leave(self, ticket: int) -> list[int]:
        """A queued ticket gave up (client disconnected); nothing else changes."""
        self.queue.pop(ticket, None)
        return self._promote()

    def expire(self, now: float) -> list[int]:
        """Queued tickets that waited longer than max_wait_s; they are removed."""
        expired = [t for t, (_, at) in self.queue.items() if now - at >= self.limits.max_wait_s]
        for ticket in expired:
            del self.queue[ticket]
        return expired

    def next_deadline(self) -> float | None:
        """When the oldest queued ticket expires."""
        if not self.queue:
            return None
        return min(at for _, at in self.queue.values()) + self.limits.max_wait_s

    def _promote(self) -> list[int]:
        admitted = []
        while self.queue and self.in_flight < self.limits.max_in_flight:
            # Highest priority first; the oldest ticket (smallest number) within a priority.
            ticket = max(self.queue, key=lambda t: (self.queue[t][0], -t))
            del self.queue[ticket]
            self.running.add(ticket)
            admitted.append(ticket)
        return admitted

    def load(self, model_id: str) -> ModelLoad:
        return ModelLoad(
            id=model_id,
            in_flight=self.in_flight,
            queue_depth=self.queue_depth,
            max_in_flight=self.limits.max_in_flight,
            max_queue_depth=self.limits.max_queue_depth,
        )
