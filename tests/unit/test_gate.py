"""The async gate: a client that leaves while queued gives its place back at once; waiters go
when they fit (recheck) or are refused when their own patience runs out."""

from __future__ import annotations

import asyncio

import pytest

from services.admission.core import AdmissionLimits
from services.admission.gate import Abandoned, Gate, Rejected
from tests.helpers import eventually


def gate() -> Gate:
    return Gate(AdmissionLimits(max_in_flight=1, max_queue_depth=4, max_wait_s=60.0))


class Client:
    """Stands in for the HTTP connection: gone() returns once leave() is called."""

    def __init__(self) -> None:
        self.left = asyncio.Event()
        self.watched = self.unwatched = 0

    async def gone(self) -> None:
        self.watched += 1
        try:
            await self.left.wait()
        except asyncio.CancelledError:
            self.unwatched += 1
            raise

    def leave(self) -> None:
        self.left.set()


async def hold(g: Gate, client: Client, priority: int = 0) -> None:
    async with g.slot(priority, client.gone):
        await asyncio.Event().wait()  # until cancelled


async def test_leaving_while_queued_frees_the_place_and_admits_nobody_in_its_stead() -> None:
    g = gate()
    running = asyncio.create_task(hold(g, Client()))
    leaver = Client()
    queued = asyncio.create_task(hold(g, leaver))
    stays = asyncio.create_task(hold(g, Client()))
    await asyncio.sleep(0)
    assert (g.core.in_flight, g.core.queue_depth) == (1, 2)
    leaver.leave()
    with pytest.raises(Abandoned):
        await queued
    assert (g.core.in_flight, g.core.queue_depth) == (1, 1)
    running.cancel()  # the next in line still gets the slot
    await asyncio.sleep(0)
    assert (g.core.in_flight, g.core.queue_depth) == (1, 0)
    stays.cancel()
    await asyncio.gather(running, stays, return_exceptions=True)
    assert g.idle.is_set()


async def test_admitted_at_once_never_watches_the_client() -> None:
    g, client = gate(), Client()
    async with g.slot(0, client.gone):
        await asyncio.sleep(0)
    assert client.watched == 0  # no task for a request that never queued


async def test_admitted_in_the_instant_the_client_left_gives_the_slot_back() -> None:
    g = gate()
    first = asyncio.create_task(hold(g, Client()))
    leaver = Client()
    queued = asyncio.create_task(hold(g, leaver))
    await asyncio.sleep(0)
    first.cancel()  # admits the queued one...
    leaver.leave()  # ...while its client leaves, before either wakes it
    with pytest.raises(Abandoned):
        async with asyncio.timeout(5):  # not admitted and left running for nobody
            await queued
    await asyncio.gather(first, return_exceptions=True)
    assert (g.core.in_flight, g.core.queue_depth) == (0, 0)


async def test_the_watch_ends_once_admitted() -> None:
    g = gate()
    first = asyncio.create_task(hold(g, Client()))
    client = Client()
    await asyncio.sleep(0)
    admitted = asyncio.Event()

    async def second() -> None:
        async with g.slot(0, client.gone):
            admitted.set()
            await asyncio.sleep(0)
            assert client.unwatched == 1  # nothing keeps reading the client's messages
            client.leave()  # leaving now is the response's business, not the queue's
            await asyncio.sleep(0)

    task = asyncio.create_task(second())
    await eventually(lambda: client.watched == 1)
    assert g.core.queue_depth == 1
    first.cancel()
    await task  # no Abandoned: the watcher was cancelled when the slot came
    assert admitted.is_set()
    await asyncio.gather(first, return_exceptions=True)
    assert g.idle.is_set()


async def test_recheck_admits_a_waiter_once_it_fits() -> None:
    g = gate()
    room = asyncio.Event()  # stands in for the router's fleet view
    admitted = asyncio.Event()

    async def waiter() -> None:
        async with g.slot(0, Client().gone, fits=room.is_set):
            admitted.set()

    task = asyncio.create_task(waiter())
    await eventually(lambda: g.core.queue_depth == 1)  # a free slot, but no room beyond it
    g.recheck()
    assert g.core.queue_depth == 1
    room.set()
    g.recheck()
    await asyncio.wait_for(task, 5)
    assert admitted.is_set()
    assert g.idle.is_set()


async def test_a_waiter_whose_patience_runs_out_is_refused_as_deadline() -> None:
    g = gate()  # max_wait 60 s

    async def wait() -> None:
        async with g.slot(0, Client().gone, patience_s=0.05, fits=lambda: False):
            pass

    with pytest.raises(Rejected) as refused:
        await asyncio.wait_for(wait(), 5)  # its own 0.05 s, never the gate's 60 s
    assert refused.value.busy.reason == "deadline"
    assert (g.core.in_flight, g.core.queue_depth) == (0, 0)


async def test_a_slot_taken_at_once_is_given_back_once() -> None:
    g = gate()  # one slot
    changes = []
    g.on_change = lambda: changes.append(g.core.in_flight)
    assert g.open()
    held = g.take()
    assert not g.open()
    assert not g.idle.is_set()
    with pytest.raises(RuntimeError):
        g.take()  # only for a caller that found it open
    other = asyncio.create_task(hold(g, Client()))
    await eventually(lambda: g.core.queue_depth == 1)
    held.release()  # the one queued behind it runs now
    reported = len(changes)
    held.release()  # a second release frees nobody's slot and changes nothing
    assert (g.core.in_flight, g.core.queue_depth) == (1, 0)
    assert len(changes) == reported
    other.cancel()
    await asyncio.gather(other, return_exceptions=True)
    assert g.idle.is_set()


async def queued(g: Gate, patience_s: float) -> None:
    async with g.slot(0, Client().gone, patience_s=patience_s):
        pass


async def test_every_waiter_runs_out_on_its_own_deadline_and_no_timer_outlives_the_queue() -> None:
    g = gate()
    running = g.take()
    patient = asyncio.create_task(queued(g, 30.0))  # the timer is armed for it
    await eventually(lambda: g.core.queue_depth == 1)
    with pytest.raises(Rejected) as refused:  # queued later, due sooner: the timer moves up
        await asyncio.wait_for(queued(g, 0.05), 5)
    assert refused.value.busy.reason == "deadline"
    leaver = asyncio.create_task(queued(g, 0.05))  # due first, then gone before it is due
    short = asyncio.create_task(queued(g, 0.2))
    await eventually(lambda: g.core.queue_depth == 3)
    leaver.cancel()
    with pytest.raises(Rejected):  # the timer set for the leaver looked again for it
        await asyncio.wait_for(short, 5)
    running.release()  # the patient one runs: nobody waits, no timer is left
    await asyncio.wait_for(patient, 5)
    assert g._timer is None
    assert (g.core.in_flight, g.core.queue_depth) == (0, 0)
