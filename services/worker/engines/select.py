"""Engine selection: which engine a config asks for, and building and loading it.

auto = exllamav2 when a model dir is given and CUDA + exllamav2 work; else transformers on CPU
with the model dir; with no model dir, the demo checkpoint (created if missing) on CPU.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from services.common.errors import ConfigError
from services.worker.config import WorkerConfig
from services.worker.engines.base import Engine
from services.worker.engines.demo_model import DEMO_NAME, is_model_dir
from services.worker.engines.sim import SimEngine, SimSettings

log = logging.getLogger(__name__)
DEFAULT_DEMO_DIR = Path(".switchboard") / "demo-model"


def sim_settings(cfg: WorkerConfig) -> SimSettings:
    return SimSettings(
        ttft_s=cfg.sim_ttft_s,
        tokens_per_s=cfg.sim_tokens_per_s,
        max_batch=cfg.sim_max_batch,
        max_context=cfg.sim_max_context,
        slowdown_per_seq=cfg.sim_slowdown_per_seq,
        prefill_tokens_per_s=cfg.sim_prefill_tokens_per_s,
        prefix_cache_blocks=cfg.sim_prefix_cache_blocks,
    )


def ensure_demo_model(directory: Path) -> Path:
    """Create the demo checkpoint once (built aside, then renamed, so a reader never sees half)."""
    if is_model_dir(directory):
        return directory
    from services.worker.engines.demo_model import make_demo_model

    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".demo-", dir=directory.parent))
    try:
        make_demo_model(scratch)
        try:
            os.rename(scratch, directory)
        except OSError:  # someone else finished first
            if not is_model_dir(directory):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return directory


def resolve(cfg: WorkerConfig) -> tuple[str, Path | None]:
    """(engine kind, model dir) for a config; raises ConfigError for impossible combinations."""
    model_dir = Path(cfg.model_dir) if cfg.model_dir else None
    if model_dir is not None and not is_model_dir(model_dir):
        raise ConfigError(
            f"config error in field 'model_dir': {model_dir} is not a model directory "
            "(needs config.json and *.safetensors)"
        )
    kind = cfg.engine
    if kind == "auto":
        if model_dir is None:
            log.info("no model configured: using the demo checkpoint on CPU (transformers)")
            return "transformers", ensure_demo_model(DEFAULT_DEMO_DIR)
        from services.worker.engines.exl2 import cuda_ready

        ok, why = cuda_ready()
        if ok:
            return "exllamav2", model_dir
        log.info("exllamav2 not usable (%s): serving %s with transformers on CPU", why, model_dir)
        return "transformers", model_dir
    if kind in ("transformers", "exllamav2") and model_dir is None:
        if kind == "exllamav2":
            raise ConfigError(
                "config error in field 'model_dir': --engine exllamav2 needs --model-dir"
            )
        return kind, ensure_demo_model(DEFAULT_DEMO_DIR)
    return kind, model_dir


def model_name(cfg: WorkerConfig, model_dir: Path) -> str:
    if cfg.models:
        return cfg.models[0]
    if model_dir.resolve().name in ("demo-model", DEMO_NAME):
        return DEMO_NAME
    return model_dir.resolve().name


async def build_engines(cfg: WorkerConfig) -> list[Engine]:
    """Load every engine the config names; fail with a clear ConfigError when impossible."""
    kind, model_dir = resolve(cfg)
    engines: list[Engine]
    if kind == "sim":
        engines = [SimEngine(name, sim_settings(cfg)) for name in cfg.models or ("sim-model",)]
    elif kind == "transformers":
        assert model_dir is not None
        from services.worker.engines.hf import TransformersEngine

        engines = [TransformersEngine(model_dir, model_name(cfg, model_dir))]
    else:
        assert model_dir is not None
        from services.worker.engines.exl2 import ExLlamaV2Engine

        engines = [
            ExLlamaV2Engine(model_dir, model_name(cfg, model_dir), max_batch=cfg.exl2_max_batch)
        ]
    for engine in engines:
        await engine.load()
        log.info(
            "engine ready",
            extra={"model": engine.model_id, "engine": kind, "max_batch": engine.limits.max_batch},
        )
    return engines
