"""Async gate around the admission core: wait for a slot, give it back on every path."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

from services.admission.core import Admission, AdmissionLimits, Busy, Fits, Queued

# What Gate.slot asks for: priority, gone, patience_s, fits, asked.
Ask = tuple[int, Callable[[], Awaitable[object]] | None, float | None, Fits | None, bool]


class Rejected(Exception):
    def __init__(self, busy: Busy) -> None:
        super().__init__(f"busy: {busy.reason}")
        self.busy = busy


class Abandoned(Exception):
    """The client left while its request waited in the queue; its place is already given back."""


class Gate:
    """One per model. on_change is called after every change of in_flight or queue_depth."""

    def __init__(
        self,
        limits: AdmissionLimits,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = Admission(limits)
        self.on_change = on_change
        self.clock = clock
        self._waiters: dict[int, asyncio.Future[None]] = {}
        # Armed for the earliest queued deadline; a ticket leaving early does not move it (it
        # fires, finds nothing due yet and is armed for the next), so a release costs no timer.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.idle = asyncio.Event()  # set while nothing runs or waits (drain waits on it)
        self.idle.set()

    def slot(
        self,
        priority: int = 0,
        gone: Callable[[], Awaitable[object]] | None = None,
        *,
        patience_s: float | None = None,
        fits: Fits | None = None,
        asked: bool = False,
    ) -> Slot:
        """A running slot held for an `async with` body; entering raises Rejected when there
        is no room.

        gone: returns once the client has left; watched only while queued (then Abandoned).
        patience_s, fits, asked: as Admission.request takes them (the router's deadline and
        fleet)."""
        return Slot(self, None, (priority, gone, patience_s, fits, asked))

    def open(self) -> bool:
        """Would take() admit a request now (it is the caller's to ask whether it fits)?"""
        return self.core.open()

    def take(self) -> Slot:
        """A running slot now, already held (release() it), for a caller that found the gate
        open() and its request fitting, with nothing run since."""
        admitted = self.core.admit()
        if admitted is None:
            raise RuntimeError("take() from a gate that is not open")
        self._changed()
        return Slot(self, admitted.ticket)

    async def _enter(
        self,
        priority: int,
        gone: Callable[[], Awaitable[object]] | None,
        patience_s: float | None,
        fits: Fits | None,
        asked: bool,
    ) -> int:
        verdict = self.core.request(self.clock(), priority, patience_s, fits, asked=asked)
        if isinstance(verdict, Busy):
            raise Rejected(verdict)
        ticket = verdict.ticket
        self._changed()
        if isinstance(verdict, Queued):
            await self._wait(ticket, gone)
        return ticket

    def _release(self, ticket: int, duration_s: float | None) -> None:
        self._admit(self.core.release(ticket, duration_s))
        self._changed()

    async def _wait(self, ticket: int, gone: Callable[[], Awaitable[object]] | None) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = future
        self._arm(self.core.queue[ticket].until)
        # A task only for requests that queue: the common admitted-at-once path stays task-free.
        watcher = None if gone is None else asyncio.ensure_future(gone())
        if watcher is not None:
            watcher.add_done_callback(lambda w: _abandon(future, w))
        try:
            await future
            if watcher is not None and watcher.done() and not watcher.cancelled():
                raise Abandoned()  # admitted in the same instant the client left
        except (asyncio.CancelledError, Abandoned):
            if ticket in self.core.running:  # admitted just as the client left: give it back
                self._admit(self.core.release(ticket))
            else:
                self._admit(self.core.leave(ticket))
            self._changed()
            raise
        finally:
            self._waiters.pop(ticket, None)
            if watcher is not None:
                watcher.cancel()

    def _admit(self, tickets: list[int]) -> None:
        for ticket in tickets:
            waiter = self._waiters.get(ticket)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self._timer is not None and not self.core.queue:
            self._disarm()  # nothing left to expire

    def _arm(self, deadline: float) -> None:
        """Expire at `deadline` unless the timer fires earlier already."""
        if deadline >= self._timer_at:
            return
        self._disarm()
        delay = max(deadline - self.clock(), 0.0)
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire)
        self._timer_at = deadline

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf

    def _expire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        expired = self.core.expire(self.clock())
        for ticket, reason in expired:
            waiter = self._waiters.get(ticket)
            if waiter is not None and not waiter.done():
                waiter.set_exception(Rejected(Busy(reason, self.core.retry_after_s())))
        if expired:
            self._changed()
        deadline = self.core.next_deadline()
        if deadline is not None:
            self._arm(deadline)

    def _changed(self) -> None:
        if self.core.running or self.core.queue:
            self.idle.clear()
        else:
            self.idle.set()
        self.on_change()

    def set_limit(self, max_in_flight: int) -> None:
        self._admit(self.core.set_limit(max_in_flight))
        self._changed()

    def recheck(self) -> None:
        """What queued requests' `fits` reads changed: admit those it now fits."""
        admitted = self.core.promote()
        if admitted:
            self._admit(admitted)
            self._changed()

    def drain(self) -> None:
        """Refuse newcomers from now on; running and queued requests still complete."""
        self.core.draining = True


class Slot:
    """A gate's running slot: entered by `async with` (Gate.slot) or held from Gate.take();
    given back once, on success, error and cancellation (client disconnect) alike."""

    __slots__ = ("_ask", "_gate", "_started", "_ticket")

    def __init__(self, gate: Gate, ticket: int | None, ask: Ask | None = None) -> None:
        self._gate, self._ticket, self._ask = gate, ticket, ask
        self._started = 0.0 if ticket is None else gate.clock()

    async def __aenter__(self) -> None:
        if self._ask is not None:
            self._ticket = await self._gate._enter(*self._ask)
            self._started = self._gate.clock()  # service time: from admission, not arrival

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release(failed=kind is not None)

    def release(self, failed: bool = False) -> None:
        """Give the slot back (a failed request's duration is not measured); later calls: no-op."""
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            gate = self._gate
            gate._release(ticket, None if failed else gate.clock() - self._started)


def _abandon(waiter: asyncio.Future[None], watcher: asyncio.Future[object]) -> None:
    """The client-gone watcher finished: wake the waiter with Abandoned unless it moved on."""
    if not watcher.cancelled():
        watcher.exception()  # retrieved, so a failed watcher is not logged as never retrieved
        if not waiter.done():
            waiter.set_exception(Abandoned())
