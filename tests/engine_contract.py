"""Checks every real engine must pass behind the worker's HTTP API (CPU and GPU test files share
them): a streamed chat completion with the official client, exact usage counts, and cancellation
on client disconnect."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.helpers import eventually

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Route this request, please."},
]


def reference_token_count(model_dir: Path, text: str) -> int:
    """Count with the checkpoint's own tokenizer.json, independently of any engine."""
    from tokenizers import Tokenizer

    return len(
        Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        .encode(text, add_special_tokens=False)
        .ids
    )


async def check_stream_and_usage(worker: Any, model: str, model_dir: Path) -> None:
    engine = worker.service.models[model].engine
    from schemas.inference import ChatMessage

    prompt = engine.chat_prompt([ChatMessage(**m) for m in MESSAGES])
    expected_prompt_tokens = reference_token_count(model_dir, prompt)
    client = openai.AsyncOpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        usage = None
        finish = None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert usage is not None
        assert usage.prompt_tokens == expected_prompt_tokens
        assert finish in ("length", "stop")
        if finish == "length":
            assert usage.completion_tokens == 12
        assert 1 <= usage.completion_tokens <= 12
        full = await client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=12, temperature=0
        )
        assert full.usage is not None
        assert full.usage.prompt_tokens == expected_prompt_tokens
        assert full.choices[0].message.content == "".join(pieces)  # greedy: the same text twice
    finally:
        await client.close()


async def check_cancel_on_disconnect(worker: Any, model: str, steps: Any) -> None:
    """A client that goes away mid-generation stops the engine: no slot held, no steps wasted."""
    engine = worker.service.models[model].engine
    gate = worker.service.models[model].gate
    body = {"model": model, "messages": MESSAGES, "max_tokens": 1500, "stream": True}
    async with aiohttp.ClientSession() as s:
        try:
            async with s.post(
                worker.url + "/v1/chat/completions",
                json=body,
                timeout=aiohttp.ClientTimeout(total=0.5),
            ) as resp:
                async for _ in resp.content:
                    pass
        except TimeoutError:
            pass
    await eventually(lambda: gate.core.in_flight == 0 and engine.running == 0, timeout_s=10)
    before = steps()
    await asyncio.sleep(0.3)
    assert steps() == before, "the engine kept generating for a client that left"
