"""One admitted request's engine jobs (one per choice) and their chunks, merged as they come."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from services.worker.engines.base import Chunk, Job


class Run:
    """An admitted request: its jobs (choice i is jobs[i]), when it got its slots, and when
    each job gave its first token."""

    def __init__(self, jobs: Sequence[Job], model: str, started: float) -> None:
        self.jobs, self.model, self.started = tuple(jobs), model, started
        self.ttft_s: list[float | None] = [None] * len(jobs)

    def token_came(self, index: int, now: float) -> float | None:
        """Job index gave a chunk at now: the request's time to first token if it is the first
        of all its jobs' (each job's own is kept in ttft_s)."""
        if self.ttft_s[index] is not None:
            return None
        first = all(t is None for t in self.ttft_s)
        self.ttft_s[index] = now - self.started
        return self.ttft_s[index] if first else None

    @property
    def prompt_tokens(self) -> int:
        """Counted once, however many choices (OpenAI's usage)."""
        return self.jobs[0].prompt_tokens

    @property
    def completion_tokens(self) -> int:
        """Every choice's."""
        return sum(job.completion_tokens for job in self.jobs)

    @property
    def finished(self) -> bool:
        """Every job ended on its own (False: the client left first, or one failed)."""
        return all(job.finished for job in self.jobs)

    def cancel(self) -> None:
        """Stop the jobs still generating (a no-op for finished ones): frees their engine slots."""
        for job in self.jobs:
            job.cancel()


async def merged(jobs: Sequence[Job]) -> AsyncGenerator[tuple[int, Chunk], None]:
    """(choice index, chunk) of every job as each comes, until all have ended; a job's error is
    raised at once. Close it (contextlib.aclosing) to stop listening early."""
    if len(jobs) == 1:  # the common case: no tasks
        async for chunk in jobs[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Chunk | Exception | None]] = asyncio.Queue()

    async def pump(index: int, job: Job) -> None:
        try:
            async for chunk in job:
                queue.put_nowait((index, chunk))
        except Exception as exc:  # the engine failed this job: the request fails with it
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    pumps = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        left = len(jobs)
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
