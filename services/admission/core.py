"""Admission control: slots plus a bounded priority queue with a max wait. Pure, no I/O.

Used by the worker (per model, limit = the engine's batch) and the router's gateway admission
(per model, limit = an operator's capacity override, else none; docs/router.md). Invariants:
- in_flight <= max_in_flight and len(queue) <= max_queue_depth, except that lowering the limit
  never evicts a running request (in_flight drains down to it).
- A ticket is in exactly one place: running, queued, or gone; release()/leave() of an unknown
  ticket is a no-op, so a double release can never free someone else's slot.
- Queued tickets are admitted highest priority first, FIFO within a priority.
- A request may bring its own patience (shorter than max_wait_s): it waits at most that long and
  is then refused as "deadline" (max_wait_s: "timeout"); with no time to wait it is refused at
  once instead of queued.
- A request may bring `fits`: whether something beyond the slots (the router's fleet view) can
  take it now. It is asked only for the request about to be admitted (a free slot, nobody ahead
  of it), and True admits it, so the caller may reserve what it found. A queued request it does
  not fit stays at the head: nobody jumps it; promote() asks again when that world changed.
  A caller may ask first (open(), then admit()) and request() with asked=True when it did not fit.
- Retry-After comes from measured service time (EWMA of request durations), not a constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import msgspec

from schemas.load import ModelLoad

RejectReason = Literal["queue_full", "timeout", "deadline", "draining"]
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 60
Fits = Callable[[], bool]


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


class Waiting(msgspec.Struct, frozen=True):
    """A queued ticket: its priority, when it came, until when it may wait, and why it would be
    refused then; fits as given to request()."""

    priority: int
    since: float
    until: float
    reason: RejectReason
    fits: Fits | None = None


class Admission:
    """Slots and a bounded priority queue for one model."""

    def __init__(self, limits: AdmissionLimits, initial_service_s: float = 1.0) -> None:
        self.limits = limits
        self.running: set[int] = set()
        self.queue: dict[int, Waiting] = {}
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

    def open(self) -> bool:
        """A newcomer would be admitted now if it fits: not draining, a free slot, nobody queued."""
        return (
            not self.queue and len(self.running) < self.limits.max_in_flight and not self.draining
        )

    def admit(self) -> Admitted | None:
        """Admitted now when open() (the caller has asked its own `fits`); else None, nothing
        changed."""
        if not self.open():
            return None
        self._next += 1
        self.running.add(self._next)
        return Admitted(self._next)

    def request(
        self,
        now: float,
        priority: int = 0,
        patience_s: float | None = None,
        fits: Fits | None = None,
        *,
        asked: bool = False,
    ) -> Verdict:
        """patience_s: the most this request may wait (capped by max_wait_s); fits: see above;
        asked: `fits` said no an instant ago (nothing changed since), so it is not asked again:
        the request queues (or is refused) as if it had been."""
        if self.draining:
            return Busy("draining", self.retry_after_s())
        self._next += 1
        ticket = self._next
        free = self.in_flight < self.limits.max_in_flight and not self.queue
        if free and not asked and (fits is None or fits()):  # asked only when a slot is free
            self.running.add(ticket)
            return Admitted(ticket)
        own = patience_s is not None and patience_s < self.limits.max_wait_s
        wait = patience_s if patience_s is not None and own else self.limits.max_wait_s
        if wait <= 0:  # it cannot usefully wait at all
            return Busy("deadline", self.retry_after_s())
        if self.queue_depth < self.limits.max_queue_depth:
            reason: RejectReason = "deadline" if own else "timeout"
            self.queue[ticket] = Waiting(priority, now, now + wait, reason, fits)
            ahead = sum(1 for w in self.queue.values() if w.priority >= priority)
            return Queued(ticket, ahead)
        return Busy("queue_full", self.retry_after_s())

    def set_limit(self, max_in_flight: int) -> list[int]:
        """Change the slot count (capacity moved); return tickets admitted by a raise."""
        self.limits = msgspec.structs.replace(self.limits, max_in_flight=max(max_in_flight, 0))
        return self.promote()

    def release(self, ticket: int, duration_s: float | None = None) -> list[int]:
        """A running ticket finished, failed or lost its client; return the tickets now admitted."""
        if ticket not in self.running:
            return []
        self.running.discard(ticket)
        if duration_s is not None:
            # EWMA: recent requests weigh most, one outlier does not swing Retry-After.
            self.mean_service_s = 0.8 * self.mean_service_s + 0.2 * max(duration_s, 0.0)
        return self.promote()

    def leave(self, ticket: int) -> list[int]:
        """A queued ticket gave up (client disconnected); nothing else changes."""
        self.queue.pop(ticket, None)
        return self.promote()

    def expire(self, now: float) -> list[tuple[int, RejectReason]]:
        """Queued tickets whose wait is up, with why; they are removed."""
        expired = [(t, w.reason) for t, w in self.queue.items() if now >= w.until]
        for ticket, _ in expired:
            del self.queue[ticket]
        return expired

    def next_deadline(self) -> float | None:
        """When the first queued ticket's wait is up."""
        if not self.queue:
            return None
        return min(w.until for w in self.queue.values())

    def promote(self) -> list[int]:
        """Admit queued tickets while there are slots and the next in line fits; return them.
        Also for when what `fits` reads changed (the router's fleet view)."""
        admitted = []
        while self.queue and self.in_flight < self.limits.max_in_flight:
            # Highest priority first; the oldest ticket (smallest number) within a priority.
            ticket = max(self.queue, key=lambda t: (self.queue[t].priority, -t))
            fits = self.queue[ticket].fits
            if fits is not None and not fits():
                break  # it waits for room beyond the slots, and nobody jumps it
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
