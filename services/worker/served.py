"""The models a worker serves: each one's engine behind its admission gate (shell side)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from services.admission.core import Admission, Busy
from services.admission.gate import Gate, Rejected
from services.worker.core import ModelStats
from services.worker.engines.base import Engine, Job, PrefixCaching, SamplingParams
from services.worker.prefix_cache import PrefixCache


class ServedModel:
    def __init__(self, engine: Engine, gate: Gate, stats: ModelStats | None = None) -> None:
        self.engine = engine
        self.gate = gate
        self.stats = stats or ModelStats()  # what its finished requests measured
        # Requests of n > 1 slots take theirs one at a time: two taking turns could each hold
        # some and wait for the other's forever (until max_wait_s).
        self._taking = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def slots(
        self, n: int, gone: Callable[[], Awaitable[object]] | None = None
    ) -> AsyncIterator[None]:
        """Hold n of the gate's slots for the body, or none: Rejected (busy) or Abandoned (the
        client left) when not all of them come within the gate's max_wait_s; the ones taken are
        given back first. Queued, each slot waits its turn like any request's."""
        if n == 1:
            async with self.gate.slot(gone=gone):
                yield
            return
        async with contextlib.AsyncExitStack() as held:
            try:
                async with asyncio.timeout(self.gate.core.limits.max_wait_s), self._taking:
                    for _ in range(n):
                        await held.enter_async_context(self.gate.slot(gone=gone))
            except TimeoutError:
                raise Rejected(Busy("timeout", self.gate.core.retry_after_s())) from None
            yield

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The engine's prefix cache; None: it keeps none (it then gets no blocks)."""
        engine = self.engine
        return engine.prefix_cache if isinstance(engine, PrefixCaching) else None

    def start(self, prompt: str, params: SamplingParams, blocks: tuple[int, ...]) -> Job:
        """Start a job, handing its prompt blocks to an engine with a prefix cache."""
        engine = self.engine
        if isinstance(engine, PrefixCaching):
            return engine.start(prompt, params, blocks)
        return engine.start(prompt, params)


def admissions(models: Mapping[str, ServedModel]) -> dict[str, Admission]:
    """Each model's admission core: what the worker's pure decisions read."""
    return {name: served.gate.core for name, served in models.items()}


def stats(models: Mapping[str, ServedModel]) -> dict[str, ModelStats]:
    """Each model's measured rates and prefix-cache counters."""
    return {name: served.stats for name, served in models.items()}


def prefix_caches(models: Mapping[str, ServedModel]) -> dict[str, PrefixCache]:
    """The served models whose engine keeps a prefix cache, and their caches."""
    caches = {name: served.prefix_cache for name, served in models.items()}
    return {name: cache for name, cache in caches.items() if cache is not None}
