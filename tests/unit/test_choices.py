"""n > 1: a request's n slots (all or none, no two requests deadlocked on halves) and its jobs'
chunks merged as they come."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator

import pytest

from services.admission.core import AdmissionLimits
from services.admission.gate import Gate, Rejected
from services.worker.engines.base import Chunk, EngineError, Job
from services.worker.engines.sim import SimEngine
from services.worker.run import Run, merged
from services.worker.served import ServedModel
from tests.helpers import eventually


def served(slots: int = 4, queue: int = 8, wait_s: float = 5.0) -> ServedModel:
    limits = AdmissionLimits(max_in_flight=slots, max_queue_depth=queue, max_wait_s=wait_s)
    return ServedModel(SimEngine("m"), Gate(limits))


@contextlib.asynccontextmanager
async def others(model: ServedModel, n: int) -> AsyncIterator[contextlib.AsyncExitStack]:
    """n slots held by other requests, one each; close the stack to give them back."""
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(n):
            await stack.enter_async_context(model.gate.slot())
        yield stack


async def test_n_slots_are_held_together_and_given_back() -> None:
    model = served()
    async with model.slots(3):
        assert model.gate.core.in_flight == 3
    assert model.gate.core.in_flight == 0
    async with model.slots(1):
        assert model.gate.core.in_flight == 1


@pytest.mark.parametrize(
    ("queue", "wait_s", "reason"), [(0, 5.0, "queue_full"), (8, 0.1, "timeout")]
)
async def test_no_partial_hold_when_not_all_come(queue: int, wait_s: float, reason: str) -> None:
    model = served(queue=queue, wait_s=wait_s)
    async with others(model, 2):
        with pytest.raises(Rejected) as refused:
            async with model.slots(3):
                raise AssertionError("admitted with two slots of three")
        assert refused.value.busy.reason == reason
        # the two it took are back: nothing held or queued but the others' two
        assert (model.gate.core.in_flight, model.gate.core.queue_depth) == (2, 0)


async def test_two_requests_never_hold_halves_of_the_slots() -> None:
    """4 slots, all busy; two n=3 requests wait. Were they to take slots in turns, each would
    get one as the first two are freed, and one more as the last two are: two each, each
    waiting for the other's until max_wait_s."""
    model = served(slots=4, wait_s=5.0)
    order: list[str] = []
    release = {name: asyncio.Event() for name in "ab"}

    async def request(name: str) -> None:
        async with model.slots(3):
            order.append(name)
            await release[name].wait()

    busy = [contextlib.AsyncExitStack() for _ in range(4)]
    for stack in busy:
        await stack.enter_async_context(model.gate.slot())
    a = asyncio.create_task(request("a"))
    await eventually(lambda: model.gate.core.queue_depth == 1)
    b = asyncio.create_task(request("b"))
    await asyncio.sleep(0.05)
    for stack in busy:  # freed one by one, each taken before the next is
        await stack.aclose()
        await asyncio.sleep(0.02)
    await eventually(lambda: order == ["a"], timeout_s=2)
    assert model.gate.core.in_flight == 4  # a's 3, and b's first
    release["a"].set()
    await eventually(lambda: order == ["a", "b"], timeout_s=2)
    release["b"].set()
    await asyncio.gather(a, b)
    assert (model.gate.core.in_flight, model.gate.core.queue_depth) == (0, 0)


# ---- merged chunks ----


def came(got: list[tuple[int, str]], count: int) -> bool:
    return len(got) == count


def job() -> Job:
    return Job(prompt_tokens=3)


async def test_chunks_come_as_they_come_with_their_choice() -> None:
    jobs = [job(), job()]
    got: list[tuple[int, str]] = []

    async def read() -> None:
        async for i, chunk in merged(jobs):
            got.append((i, chunk.text))

    reader = asyncio.create_task(read())
    for count, (i, text) in enumerate([(1, "b1"), (0, "a1"), (1, "b2")], start=1):
        jobs[i].push(Chunk(text=text, tokens=1))
        await eventually(functools.partial(came, got, count))  # each in the order it came
    jobs[1].push(Chunk(text="", tokens=0, finish_reason="stop"))
    jobs[0].push(Chunk(text="a2", tokens=1, finish_reason="length"))
    await reader
    assert got == [(1, "b1"), (0, "a1"), (1, "b2"), (1, ""), (0, "a2")]
    run = Run(jobs, "m", 0.0)
    assert (run.prompt_tokens, run.completion_tokens, run.finished) == (3, 4, True)


async def test_a_failed_job_fails_the_request_and_closing_stops_listening() -> None:
    jobs = [job(), job(), job()]
    jobs[2].push(EngineError("out of memory"))

    async def read_all() -> None:
        async with contextlib.aclosing(merged(jobs)) as chunks:
            async for _ in chunks:
                pass

    with pytest.raises(EngineError, match="out of memory"):
        await read_all()
    tasks = len(asyncio.all_tasks())
    jobs = [job(), job()]
    jobs[0].push(Chunk(text="x", tokens=1))
    async with contextlib.aclosing(merged(jobs)) as chunks:
        async for _ in chunks:
            break
    await eventually(lambda: len(asyncio.all_tasks()) == tasks)  # no reader left behind
    run = Run(jobs, "m", 0.0)
    run.cancel()
    assert all(j.cancelled for j in jobs)
    assert not run.finished
