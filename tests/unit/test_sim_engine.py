"""The simulator engine: determinism, limits, stop strings, batching, cancellation, prefill and
its prefix cache."""

from __future__ import annotations

import asyncio
import math

import msgspec
import pytest

from schemas.inference import ChatMessage
from services.worker.engines.base import Chunk, Job, PrefixUse, SamplingParams
from services.worker.engines.sim import VOCAB, SimEngine, SimSettings, prefill_s, prefix_use
from services.worker.engines.template import ChatOptions
from tests.helpers import eventually

LEFT_OUT = -math.inf
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


async def test_vllm_end_controls() -> None:
    """min_tokens holds the end (eos_after) and stop_token_ids back; ignore_eos makes the end an
    ordinary token; a stop token ends the job ("stop") without its text."""
    engine = SimEngine("m", SimSettings(ttft_s=0.0, tokens_per_s=5000.0, eos_after=3))

    async def ask(**p: object) -> tuple[list[int], str | None, str]:
        chunks = await run(engine, "x", SamplingParams(max_tokens=40, seed=2, **p))  # type: ignore[arg-type]
        text = "".join(c.text for c in chunks)
        return [VOCAB.index(w) for w in text.split()], chunks[-1].finish_reason, text

    plain, reason, _ = await ask()
    assert (len(plain), reason) == (3, "stop")
    held, reason, _ = await ask(min_tokens=6)
    assert (len(held), reason) == (6, "stop")
    assert held[:3] == plain
    ignored, reason, _ = await ask(ignore_eos=True)
    assert (len(ignored), reason) == (40, "length")
    stopped, reason, _ = await ask(ignore_eos=True, stop_token_ids=(ignored[4], 0))
    first = min(i for i, t in enumerate(ignored) if t in (ignored[4], 0))
    assert (stopped, reason) == (ignored[:first], "stop")
    # before min_tokens a stop token cannot be sampled: another token comes in its place
    late, reason, _ = await ask(ignore_eos=True, stop_token_ids=(ignored[0],), min_tokens=2)
    assert late[0] != ignored[0]
    assert ignored[0] not in late[:2]
    assert reason == "stop" or len(late) == 40


async def test_min_p_shapes_the_logprobs_of_what_is_spoken() -> None:
    """The sim speaks its likeliest token either way; min_p leaves tokens out of the
    distribution its logprobs are of (after temperature, top-k, top-p)."""
    engine = SimEngine("m", FAST)
    params = SamplingParams(max_tokens=4, seed=5, logprobs=20)
    wide = await run(engine, "p", params)
    narrow = await run(engine, "p", msgspec.structs.replace(params, min_p=0.97))
    assert [c.text for c in wide] == [c.text for c in narrow]
    for w, n in zip(wide, narrow, strict=True):
        (ws,), (ns,) = w.logprobs, n.logprobs
        assert ns.chosen.logprob > ws.chosen.logprob  # less mass left out of its share
        kept = [t for t in ns.top if t.logprob > LEFT_OUT]
        assert 1 <= len(kept) < len([t for t in ws.top if t.logprob > LEFT_OUT])
        top = ws.top[0].logprob
        # the kept ones: probability >= 0.97 x the likeliest's
        assert all(t.logprob >= top + math.log(0.97) - 1e-9 for t in ws.top[: len(kept)])


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


# ---- prefill and the prefix cache ----


class Sleeps:
    """The delays the engine asks for, in order (and no waiting)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


K = SimSettings(ttft_s=0.02, prefill_tokens_per_s=1000.0)
PREFILLS: list[tuple[str, SimSettings, int, int, float]] = [
    # (case, settings, prompt tokens, cached tokens, prefill seconds)
    ("all prefilled", K, 500, 0, 0.52),
    ("half cached", K, 500, 250, 0.27),
    ("all cached: only the fixed ttft", K, 500, 500, 0.02),
    ("rate 0: prefill is free", SimSettings(ttft_s=0.02, prefill_tokens_per_s=0.0), 500, 0, 0.02),
    ("the default: prefill not modelled", SimSettings(ttft_s=0.0), 4000, 0, 0.0),
]


@pytest.mark.parametrize(
    ("settings", "prompt", "cached", "seconds"),
    [c[1:] for c in PREFILLS],
    ids=[c[0] for c in PREFILLS],
)
def test_prefill_time(settings: SimSettings, prompt: int, cached: int, seconds: float) -> None:
    assert prefill_s(settings, prompt, cached) == pytest.approx(seconds)


USES: list[tuple[str, int, int, int, int]] = [
    # (case, prompt tokens, full blocks, leading blocks held, tokens counted as cached)
    ("no blocks (shorter than one)", 40, 0, 0, 0),
    ("none held", 400, 4, 0, 0),
    ("half held", 400, 4, 2, 200),
    ("all held", 400, 4, 4, 400),
    ("rounded down: never more than held", 10, 3, 1, 3),
]


@pytest.mark.parametrize(
    ("prompt", "blocks", "hits", "cached"), [c[1:] for c in USES], ids=[c[0] for c in USES]
)
def test_cached_tokens_are_the_held_share_of_the_prompt(
    prompt: int, blocks: int, hits: int, cached: int
) -> None:
    assert prefix_use(prompt, blocks, hits) == PrefixUse(
        blocks=blocks, hits=hits, cached_tokens=cached
    )


async def test_a_cached_prompt_prefills_faster_than_a_cold_one() -> None:
    sleeps = Sleeps()
    settings = SimSettings(ttft_s=0.01, prefill_tokens_per_s=1000.0, prefix_cache_blocks=16)
    engine = SimEngine("m", settings, sleep=sleeps)
    prompt, blocks = "word " * 300, (11, 12, 13, 14)  # 300 tokens in 4 full blocks (the worker's)
    one = SamplingParams(max_tokens=1)
    cold = engine.start(prompt, one, blocks)
    assert [c.finish_reason async for c in cold] == ["length"]
    assert cold.prefix == PrefixUse(blocks=4, hits=0, cached_tokens=0)
    assert sleeps.delays == [pytest.approx(0.31)]  # 0.01 + 300 / 1000
    assert engine.prefix_cache is not None
    assert engine.prefix_cache.snapshot() == (14, 13, 12, 11)  # held once prefilled
    sleeps.delays.clear()
    warm = engine.start(prompt, one, blocks)
    assert [c.finish_reason async for c in warm] == ["length"]
    assert warm.prefix == PrefixUse(blocks=4, hits=4, cached_tokens=300)
    assert sleeps.delays == [pytest.approx(0.01)]  # the fixed ttft only
    sleeps.delays.clear()
    shared = engine.start(prompt + "more " * 100, one, (11, 12, 15, 16, 17))  # shares 2 blocks
    assert [c.finish_reason async for c in shared] == ["length"]
    assert shared.prefix == PrefixUse(blocks=5, hits=2, cached_tokens=160)
    assert sleeps.delays == [pytest.approx(0.01 + 240 / 1000)]


async def test_no_cache_by_default_and_blocks_are_ignored() -> None:
    sleeps = Sleeps()
    engine = SimEngine("m", SimSettings(ttft_s=0.0, prefill_tokens_per_s=100.0), sleep=sleeps)
    assert engine.prefix_cache is None
    for _ in range(2):
        job = engine.start("a b c d", SamplingParams(max_tokens=1), (1, 2))
        assert [c.tokens async for c in job] == [1]
        assert job.prefix is None  # no cache: nothing looked up
    assert sleeps.delays == [pytest.approx(0.04)] * 2  # every prompt prefilled in full


async def test_a_job_cancelled_during_prefill_stores_nothing() -> None:
    gate = asyncio.Event()

    async def slow(delay: float) -> None:
        await gate.wait()

    engine = SimEngine("m", SimSettings(prefix_cache_blocks=8), sleep=slow)
    job = engine.start("x " * 200, SamplingParams(max_tokens=5), (1, 2))
    await eventually(lambda: job.prefix is not None)  # prefilling
    job.cancel()
    gate.set()
    assert [c.finish_reason async for c in job] == ["cancelled"]
    assert engine.prefix_cache is not None
    assert len(engine.prefix_cache) == 0


async def test_chat_prompt_options() -> None:
    """add_generation_prompt false leaves the assistant's turn unopened; continue_final_message
    ends inside the last message; template variables change nothing (no template)."""
    engine = SimEngine("m")
    said = [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="the")]
    assert engine.chat_prompt(said).endswith("<|assistant|> the\n<|assistant|>")
    shut = ChatOptions(add_generation_prompt=False)
    assert engine.chat_prompt(said, shut) == "<|user|> hi\n<|assistant|> the"
    going = ChatOptions(add_generation_prompt=False, continue_final_message=True)
    assert engine.chat_prompt(said, going) == "<|user|> hi\n<|assistant|> the"
    assert engine.chat_prompt(said, ChatOptions(variables={"x": 1})) == engine.chat_prompt(said)


async def test_include_stop_str_in_output() -> None:
    """The stop string, or a stop_token_ids token's word, stays in the text."""
    engine = SimEngine("m", SimSettings(ttft_s=0.0, tokens_per_s=5000.0))
    full = "".join(c.text for c in await run(engine, "p", SamplingParams(max_tokens=6, seed=3)))
    words = full.split()
    stop = " " + words[2]
    at = full.index(stop)
    for include, text in ((False, full[:at]), (True, full[: at + len(stop)])):
        params = SamplingParams(
            max_tokens=6, seed=3, stop=(stop,), include_stop_str_in_output=include
        )
        assert "".join(c.text for c in await run(engine, "p", params)) == text
    k = next(i for i in range(1, len(words)) if words[i] not in words[:i])  # its first time
    token = VOCAB.index(words[k])
    for include, text in ((False, " ".join(words[:k])), (True, " ".join(words[: k + 1]))):
        params = SamplingParams(
            max_tokens=6, seed=3, stop_token_ids=(token,), include_stop_str_in_output=include
        )
        chunks = await run(engine, "p", params)
        assert "".join(c.text for c in chunks) == text
        assert sum(c.tokens for c in chunks) == k + 1
