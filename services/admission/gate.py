"""Async gate around the admission core: wait for a slot, give it back on every path."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from services.admission.core import Admission, AdmissionLimits, Busy, Fits, Queued


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
        self._timer: asyncio.TimerHandle | None = None
        self.idle = asyncio.Event()  # set while nothing runs or waits (drain waits on it)
        self.idle.set()

    @contextlib.asynccontextmanager
    async def slot(
        self,
        priority: int = 0,
        gone: Callable[[], Awaitable[object]] | None = None,
        *,
        patience_s: float | None = None,
        fits: Fits | None = None,
    ) -> AsyncIterator[None]:
        """Hold a running slot for the body; raises Rejected when there is no room.

        gone: returns once the client has left; watched only while queued (then Abandoned).
        patience_s, fits: as Admission.request takes them (the router's deadline and fleet)."""
        verdict = self.core.request(self.clock(), priority, patience_s, fits)
        if isinstance(verdict, Busy):
            raise Rejected(verdict)
        ticket = verdict.ticket
        self._changed()
        if isinstance(verdict, Queued):
            await self._wait(ticket, gone)
        started = self.clock()
        failed = True
        try:
            yield
            failed = False
        finally:
            # Released on success, error and cancellation (client disconnect) alike.
            self._admit(self.core.release(ticket, None if failed else self.clock() - started))
            self._changed()

    async def _wait(self, ticket: int, gone: Callable[[], Awaitable[object]] | None) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = future
        self._arm_timer()
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
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.core.next_deadline()
        if deadline is not None:
            delay = max(deadline - self.clock(), 0.0)
            self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        expired = self.core.expire(self.clock())
        for ticket, reason in expired:
            waiter = self._waiters.get(ticket)
            if waiter is not None and not waiter.done():
                waiter.set_exception(Rejected(Busy(reason, self.core.retry_after_s())))
        if expired:
            self._changed()
        self._arm_timer()

    def _changed(self) -> None:
        if self.core.in_flight or self.core.queue_depth:
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


def _abandon(waiter: asyncio.Future[None], watcher: asyncio.Future[object]) -> None:
    """The client-gone watcher finished: wake the waiter with Abandoned unless it moved on."""
    if not watcher.cancelled():
        watcher.exception()  # retrieved, so a failed watcher is not logged as never retrieved
        if not waiter.done():
            waiter.set_exception(Abandoned())
