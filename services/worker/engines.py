"""Engine selection: build and load the engines a worker config asks for."""

from __future__ import annotations

import logging

from services.common.errors import ConfigError
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.sim import SimEngine, SimSettings

log = logging.getLogger(__name__)


def sim_settings(cfg: WorkerConfig) -> SimSettings:
    return SimSettings(
        ttft_s=cfg.sim_ttft_s,
        tokens_per_s=cfg.sim_tokens_per_s,
        max_batch=cfg.sim_max_batch,
        max_context=cfg.sim_max_context,
        slowdown_per_seq=cfg.sim_slowdown_per_seq,
    )


async def build_engines(cfg: WorkerConfig) -> list[Engine]:
    """Load every engine the config names; fail with a clear ConfigError when impossible."""
    kind = cfg.engine
    if kind == "auto":
        kind = "sim"
    if kind == "sim":
        names = cfg.models or ("sim-model",)
        engines: list[Engine] = [SimEngine(name, sim_settings(cfg)) for name in names]
    else:
        raise ConfigError(f"config error in field 'engine': engine {kind!r} is not available")
    for engine in engines:
        await engine.load()
        log.info(
            "engine ready",
            extra={"model": engine.model_id, "engine": kind, "max_batch": engine.limits.max_batch},
        )
    return engines
