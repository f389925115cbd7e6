"""Benchmark: tokens/s of the worker's engine vs. the raw library loop, at 1, 4 and 16 streams.

Run: .venv/bin/python bench/engine.py [--engine auto|transformers|exllamav2] [--model-dir DIR]
Without --model-dir it builds the demo checkpoint in a temp dir. auto = exllamav2 on CUDA, else
transformers on CPU. Raw loop: transformers' generate() once per stream (batch 1, as the engine),
or exllamav2's dynamic generator driven directly. Ratio = engine / raw (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from schemas.inference import ChatMessage
from services.worker.engines.base import SamplingParams

PROMPT = [ChatMessage(role="user", content="Route this request to the least busy worker.")]


async def engine_rate(engine: Any, prompt: str, streams: int, tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0)

    async def one() -> int:
        return sum([c.tokens async for c in engine.start(prompt, params)])

    began = time.perf_counter()
    total = sum(await asyncio.gather(*(one() for _ in range(streams))))
    return total / (time.perf_counter() - began)


def raw_hf_rate(engine: Any, prompt: str, streams: int, tokens: int) -> float:
    import torch

    ids = torch.tensor([engine._encode(prompt)])
    began = time.perf_counter()
    total = 0
    with torch.inference_mode():
        for _ in range(streams):
            out = engine._model.generate(
                ids,
                max_new_tokens=tokens,
                do_sample=False,
                min_new_tokens=tokens,
                pad_token_id=engine._tokenizer.eos_token_id,
            )
            total += out.shape[-1] - ids.shape[-1]
    return total / (time.perf_counter() - began)


def raw_exl2_rate(engine: Any, prompt: str, streams: int, tokens: int) -> float:
    from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

    gen = engine.generator
    ids = engine._encode(prompt)
    began = time.perf_counter()
    for i in range(streams):
        gen.enqueue(
            ExLlamaV2DynamicJob(
                input_ids=ids,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                gen_settings=ExLlamaV2Sampler.Settings.greedy(),
                identifier=i,
                stop_conditions=[engine.tokenizer.eos_token_id],
            )
        )
    total = 0
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r.get("stage") == "streaming" and r.get("eos"):
                total += int(r["new_tokens"])
    return total / (time.perf_counter() - began)


async def main(kind: str, model_dir: Path | None, tokens: int) -> None:
    from services.worker.engines.demo_model import make_demo_model
    from services.worker.engines.exl2 import cuda_ready

    with tempfile.TemporaryDirectory() as tmp:
        directory = model_dir or make_demo_model(Path(tmp) / "demo")
        if kind == "auto":
            kind = "exllamav2" if cuda_ready()[0] else "transformers"
        if kind == "exllamav2":
            from services.worker.engines.exl2 import ExLlamaV2Engine

            engine: Any = ExLlamaV2Engine(directory, "bench", max_batch=16)
            raw = raw_exl2_rate
        else:
            from services.worker.engines.hf import TransformersEngine

            engine = TransformersEngine(directory, "bench")
            raw = raw_hf_rate
        await engine.load()
        prompt = engine.chat_prompt(PROMPT)
        extra = f", paged={engine.paged}" if kind == "exllamav2" else ""
        print(
            f"engine={kind} model={directory.name} max_batch={engine.limits.max_batch}{extra} "
            f"tokens/stream={tokens}"
        )
        for streams in (1, 4, 16):  # warm-up: first-use kernel and allocator costs are not overhead
            await engine_rate(engine, prompt, streams, tokens)
            await measure_raw(kind, raw, engine, prompt, streams, tokens)
        print(f"{'streams':>7} {'engine tok/s':>13} {'raw tok/s':>10} {'ratio':>6}")
        for streams in (1, 4, 16):
            ours = await engine_rate(engine, prompt, streams, tokens)
            raw_rate = await measure_raw(kind, raw, engine, prompt, streams, tokens)
            print(f"{streams:>7} {ours:>13.0f} {raw_rate:>10.0f} {ours / raw_rate:>6.2f}")
        await engine.close()


async def measure_raw(
    kind: str, raw: Any, engine: Any, prompt: str, streams: int, tokens: int
) -> float:
    if kind == "exllamav2":
        # Driven on this thread: the engine thread is idle between runs (no live jobs), so it
        # does not touch the generator meanwhile.
        return float(raw(engine, prompt, streams, tokens))
    return float(await asyncio.to_thread(raw, engine, prompt, streams, tokens))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", default="auto", choices=["auto", "transformers", "exllamav2"])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(main(args.engine, args.model_dir, args.tokens))
