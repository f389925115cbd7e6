"""The simulator engine: determinism, limits, stop strings, batching, cancellation."""

from __future__ import annotations

import asyncio

from schemas.inference import ChatMessage
from services.worker.engines.base import Chunk, Job, SamplingParams
from services.worker.engines.sim import SimEngine, SimSettings
from tests.helpers import eventually

FAST = SimSettings(ttft_s=0.0, tokens_per_s=5000.0, max_batch=4)


async def run(engine: SimEngine, prompt: str, params: SamplingParams) -> list[Chunk]:
    return [chunk async for chunk in engine.start(prompt, params)]


async def test_deterministic_and_counts_tokens() -> None:
    engine = SimEngine("m", FAST)
    a = await run(engine, "hello there", SamplingParams(max_tokens=12, seed=1))
    b = await run(engine, "hello there", SamplingParams(max_tokens=12, seed=1))
    assert a == b
    text = "".join(c.text for c in a)
    assert engine.count_tokens(text) == 12
    assert a[-1].finish_reason == "length"
    assert sum(c.tokens for c in a) == 12


async def test_stop_string_truncates_and_finishes() -> None:
    engine = SimEngine("m", FAST)
    full = "".join(c.text for c in await run(engine, "p", SamplingParams(max_tokens=30, seed=3)))
    stop = full.split()[5]
    chunks = await run(engine, "p", SamplingParams(max_tokens=30, seed=3, stop=(stop,)))
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert stop not in text
    assert full.startswith(text)


async def test_eos_and_chat_template() -> None:
    engine = SimEngine("m", SimSettings(ttft_s=0.0, tokens_per_s=5000.0, eos_after=3))
    chunks = await run(engine, "x", SamplingParams(max_tokens=50))
    assert (len(chunks), chunks[-1].finish_reason) == (3, "stop")
    prompt = engine.chat_prompt([ChatMessage(role="user", content="hi")])
    assert prompt.endswith("<|assistant|>")
    assert "<|user|> hi" in prompt


async def test_runs_a_batch_concurrently_and_cancels() -> None:
    engine = SimEngine("m", SimSettings(ttft_s=0.0, tokens_per_s=500.0, max_batch=4))
    jobs = [engine.start("p", SamplingParams(max_tokens=20)) for _ in range(4)]

    async def collect(job: Job) -> list[Chunk]:
        return [c async for c in job]

    results = await asyncio.gather(*(collect(job) for job in jobs))
    assert engine.peak_running == 4
    assert all(r[-1].finish_reason == "length" for r in results)
    job = engine.start("p", SamplingParams(max_tokens=10_000))
    seen = []
    async for chunk in job:
        seen.append(chunk)
        if len(seen) == 3:
            job.cancel()
    assert seen[-1].finish_reason == "cancelled"
    await eventually(lambda: engine.running == 0)
