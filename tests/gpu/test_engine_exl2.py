"""exllamav2 engine on CUDA with the demo checkpoint: the CPU contract plus continuous batching,
cancellation and load heartbeats. Skipped (by tests/conftest.py) without CUDA or exllamav2."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from schemas import codec
from schemas.subjects import Subjects
from services.common.bus import Bus, Message
from tests.engine_contract import MESSAGES, check_cancel_on_disconnect, check_stream_and_usage
from tests.helpers import eventually
from tests.integration.fleet_fixtures import running_worker
from tests.integration.registry_fixtures import running_registry

pytestmark = pytest.mark.gpu
MODEL = "demo"


@pytest.fixture
async def exl2_worker(nats_url: str, prefix: str, demo_dir: Path) -> AsyncIterator[Any]:
    async with (
        running_registry(nats_url, prefix),
        running_worker(
            nats_url,
            prefix,
            engine="exllamav2",
            model_dir=str(demo_dir),
            models=(MODEL,),
            heartbeat_interval_s=0.2,
            max_queue_depth=64,
        ) as w,
    ):
        yield w


async def test_streamed_chat_and_usage(exl2_worker: Any, demo_dir: Path) -> None:
    engine = exl2_worker.service.models[MODEL].engine
    # the engine's real limit is what admission (and so capacity) uses
    assert (
        exl2_worker.service.models[MODEL].gate.core.limits.max_in_flight == engine.limits.max_batch
    )
    await check_stream_and_usage(exl2_worker, MODEL, demo_dir)


async def test_cancel_frees_the_job(exl2_worker: Any) -> None:
    engine = exl2_worker.service.models[MODEL].engine
    await check_cancel_on_disconnect(exl2_worker, MODEL, lambda: engine.iterations)
    assert engine.generator.num_remaining_jobs() == 0


async def stream_one(s: aiohttp.ClientSession, url: str, max_tokens: int) -> int:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.7,
        "seed": 1,
    }
    async with s.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        usage = None
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"usage":{' in line:
                usage = codec.decode(line[6:], dict)["usage"]
        assert usage is not None
        return int(usage["completion_tokens"])


async def test_sixteen_concurrent_streams_complete(exl2_worker: Any) -> None:
    async with aiohttp.ClientSession() as s:
        counts = await asyncio.gather(*(stream_one(s, exl2_worker.url, 64) for _ in range(16)))
    assert all(1 <= c <= 64 for c in counts)
    gate = exl2_worker.service.models[MODEL].gate
    assert (gate.core.in_flight, gate.core.queue_depth) == (0, 0)


async def test_continuous_batching_runs_jobs_together(exl2_worker: Any) -> None:
    engine = exl2_worker.service.models[MODEL].engine
    if not engine.paged:
        pytest.skip(
            "continuous batching needs flash-attn >= 2.5.7 (exllamav2 paged mode); "
            "without it the dynamic generator runs one job at a time (max_batch 1)"
        )
    engine.loop.peak_running = 0
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(stream_one(s, exl2_worker.url, 128) for _ in range(16)))
    assert engine.peak_running > 1


async def test_heartbeats_show_in_flight_rise_and_fall(
    exl2_worker: Any, bus: Bus, prefix: str
) -> None:
    seen: list[tuple[float, int]] = []

    async def on_load(msg: Message) -> None:
        body = codec.load_decoder.decode(msg.data).body
        seen.append((time.monotonic(), body.models[0].in_flight + body.models[0].queue_depth))

    subject = Subjects.for_prefix(prefix).load(
        exl2_worker.service.lifecycle.principal, exl2_worker.service.worker_id
    )
    await bus.subscribe(subject, cb=on_load)
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(stream_one(s, exl2_worker.url, 400) for _ in range(4)))
    await eventually(lambda: seen and seen[-1][1] == 0, timeout_s=5)
    assert max(n for _, n in seen) >= 1


async def test_logit_bias_and_penalties(exl2_worker: Any, demo_dir: Path) -> None:
    """What tests/integration/test_worker_penalties.py checks on transformers, on exllamav2:
    logit_bias through token_bias, repetition through exllamav2's own penalty, OpenAI's
    frequency/presence through the loop's per-step token_bias updates."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_dir), local_files_only=True)

    def ids(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False))

    async def answer(s: aiohttp.ClientSession, max_tokens: int, **extra: Any) -> str:
        messages = [{"role": "user", "content": "say hi"}]
        body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        async with s.post(exl2_worker.url + "/v1/chat/completions", json=body | extra) as resp:
            data = await resp.json()
            assert resp.status == 200, data
            return str(data["choices"][0]["message"]["content"])

    async with aiohttp.ClientSession() as s:
        first = ids(await answer(s, 1))
        assert len(first) == 1, first
        plain = await answer(s, 16)
        banned = await answer(s, 16, logit_bias={str(first[0]): -100})
        assert ids(banned)[:1] != first
        assert banned != plain
        forced = ids("Switchboard")[0]
        assert forced != first[0]
        assert await answer(s, 4, logit_bias={str(forced): 100}) == tok.decode([forced] * 4)
        # On the H200 (2026-11-30) the fp16 demo model's greedy answer did not repeat its first
        # token as the CPU one does, so the penalties' effect is checked on CPU (the scripted
        # generator in tests/unit/test_exl2_loop.py); here: the real generator serves them.
        for knob in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            assert ids(await answer(s, 16, **{knob: 2})), knob
        vocab = exl2_worker.service.models[MODEL].engine.vocab_size
        body = {"model": MODEL, "messages": MESSAGES, "logit_bias": {str(vocab): 1}}
        async with s.post(exl2_worker.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "logit_bias"


async def test_logprobs_and_n_choices(exl2_worker: Any, demo_dir: Path) -> None:
    """tests/integration's logprobs and n checks on exllamav2 (docs/worker.md, "Log
    probabilities"): greedy reads the job's returned logits, which must already carry the
    penalties and logit_bias (a forced token's logprob is then ~0); sampling reads exllamav2's
    own probabilities after its top-k (the top k then hold all the mass)."""
    import math

    import openai
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_dir), local_files_only=True)
    forced = tok.encode("Switchboard", add_special_tokens=False)[0]
    client = openai.AsyncOpenAI(base_url=exl2_worker.url + "/v1", api_key="unused", max_retries=0)
    ask: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6}
    try:
        full = await client.chat.completions.create(
            **ask, temperature=0, logprobs=True, top_logprobs=3
        )
        stream = await client.chat.completions.create(
            **ask, temperature=0, logprobs=True, top_logprobs=3, stream=True
        )
        streamed = [
            t
            async for chunk in stream
            for c in chunk.choices
            for t in (c.logprobs.content or [] if c.logprobs else [])
        ]
        biased = await client.chat.completions.create(
            **ask, temperature=0, logprobs=True, logit_bias={str(forced): 100}
        )
        sampled = await client.completions.create(
            model=MODEL,
            prompt="The quick brown fox",
            max_tokens=8,
            temperature=0.8,
            logprobs=5,
            extra_body={"top_k": 5},
        )
        # three slots for n=3 even unpaged (max_batch 1: the generator then runs them in turn)
        gate = exl2_worker.service.models[MODEL].gate
        gate.set_limit(max(3, gate.core.limits.max_in_flight))
        many = await client.chat.completions.create(
            **ask, n=3, seed=1, temperature=0.8, stream=True, stream_options={"include_usage": True}
        )
        indexes: set[int] = set()
        usage = None
        async for chunk in many:
            usage = chunk.usage or usage
            indexes.update(c.index for c in chunk.choices)
    finally:
        await client.close()
    lp = full.choices[0].logprobs
    assert lp is not None
    assert lp.content is not None
    assert len(lp.content) >= 1
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in lp.content]
    for t in lp.content:  # greedy: the sampled token is the likeliest
        assert math.isclose(t.logprob, t.top_logprobs[0].logprob, abs_tol=1e-4)
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True
        )
    blp = biased.choices[0].logprobs
    assert blp is not None
    assert blp.content is not None
    assert all(t.logprob > -1e-3 for t in blp.content), "greedy logprobs missed logit_bias"
    slp = sampled.choices[0].logprobs
    assert slp is not None
    assert slp.top_logprobs is not None
    assert slp.token_logprobs is not None
    for value, top in zip(slp.token_logprobs, slp.top_logprobs, strict=True):
        assert value <= 0
        mass = math.fsum(math.exp(v) for v in top.values())
        assert 0.99 <= mass <= 1.01 or len(top) < 5  # top_k 5: those five are everything
    assert indexes == {0, 1, 2}
    assert usage is not None
    assert usage.completion_tokens <= 18
