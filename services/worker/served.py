"""The models a worker serves: each one's engine behind its admission gate (shell side)."""

from __future__ import annotations

from collections.abc import Mapping

from services.admission.core import Admission
from services.admission.gate import Gate
from services.worker.core import ModelStats
from services.worker.engines.base import Engine, Job, PrefixCaching, SamplingParams
from services.worker.prefix_cache import PrefixCache


class ServedModel:
    def __init__(self, engine: Engine, gate: Gate, stats: ModelStats | None = None) -> None:
        self.engine = engine
        self.gate = gate
        self.stats = stats or ModelStats()  # what its finished requests measured

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
