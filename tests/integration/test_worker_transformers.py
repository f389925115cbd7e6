"""The transformers CPU engine with the demo checkpoint, through the worker's HTTP API."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import msgspec
import pytest

from schemas.inference import ChatMessage
from services.worker.engines.base import SamplingParams
from services.worker.engines.demo_model import is_model_dir
from services.worker.engines.hf import TransformersEngine
from services.worker.engines.template import ChatTemplate
from tests.engine_contract import MESSAGES, check_cancel_on_disconnect, check_stream_and_usage
from tests.integration.fleet_fixtures import running_worker

pytestmark = pytest.mark.integration


@contextmanager
def warnings_recorded() -> Iterator[list[str]]:
    """Every Python warning (from any thread) and transformers log warning while inside, as text.

    The engine generates on its own thread. Python 3.11's warning filters are process-wide, so
    pytest's filterwarnings=error reaches that thread, but only as a failed job ("generation
    failed: FutureWarning ...") and only under that setting: recording names the warning and its
    thread whatever the filters. transformers announces some deprecations through its logger
    instead, once per process; clearing that once-cache keeps an earlier test from hiding them.
    """
    seen: list[str] = []

    def record(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if not issubclass(category, ResourceWarning):  # ignored project-wide (pyproject.toml)
            where = threading.current_thread().name
            seen.append(f"[{where}] {category.__name__}: {message} ({filename}:{lineno})")

    class Collect(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            seen.append(f"[{rec.threadName}] {rec.name} {rec.levelname}: {rec.getMessage()}")

    from transformers.utils import logging as hf_logging

    clear = getattr(getattr(hf_logging, "warning_once", None), "cache_clear", None)
    if clear is not None:
        clear()
    handler = Collect(logging.WARNING)
    hf_logger = logging.getLogger("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        hf_logger.addHandler(handler)
        try:
            yield seen
        finally:
            hf_logger.removeHandler(handler)


def test_demo_checkpoint_is_complete(demo_dir: Path) -> None:
    assert is_model_dir(demo_dir)
    names = {p.name for p in demo_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


def test_jinja_template_matches_transformers(demo_dir: Path) -> None:
    """The exllamav2 path renders templates itself; it must agree with transformers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_dir), local_files_only=True)
    ours = ChatTemplate.from_model_dir(demo_dir).render([ChatMessage(**m) for m in MESSAGES])
    theirs = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours == theirs


async def test_streamed_chat_and_usage(hf_worker: Any, demo_dir: Path) -> None:
    assert hf_worker.service.models["demo"].engine.limits.max_batch == 1
    with warnings_recorded() as seen:
        await check_stream_and_usage(hf_worker, "demo", demo_dir)
    assert seen == [], "generation warned (a deprecated transformers API?)"


async def test_cancel_on_disconnect_stops_generation(hf_worker: Any) -> None:
    engine = hf_worker.service.models["demo"].engine
    with warnings_recorded() as seen:
        await check_cancel_on_disconnect(hf_worker, "demo", lambda: engine.steps)
    assert seen == []


async def test_bad_model_dir_fails_at_start_naming_the_field(
    nats_url: str, prefix: str, tmp_path: Path
) -> None:
    from services.common.errors import ConfigError

    for engine in ("transformers", "auto", "exllamav2"):
        with pytest.raises(ConfigError, match="model_dir"):
            async with running_worker(
                nats_url, prefix, register=False, engine=engine, model_dir=str(tmp_path)
            ):
                pass


async def test_exllamav2_without_cuda_is_a_clear_error(
    nats_url: str, prefix: str, demo_dir: Path
) -> None:
    from services.common.errors import ConfigError
    from services.worker.engines.exl2 import cuda_ready

    if cuda_ready()[0]:
        pytest.skip("this machine has CUDA and exllamav2: tests/gpu covers that path")
    with pytest.raises(ConfigError, match="exllamav2 needs CUDA"):
        async with running_worker(
            nats_url, prefix, register=False, engine="exllamav2", model_dir=str(demo_dir)
        ):
            pass


async def test_engine_loads_and_samples_without_warnings(demo_dir: Path) -> None:
    """Loading, seeded sampling with a stop string, and greedy decoding warn about nothing; a
    seed repeats its text, and the KV cache is really used (the same text as recomputing the
    whole sequence every step: a cache the model ignored would lose the context)."""
    prompt_messages = [ChatMessage(**m) for m in MESSAGES]
    with warnings_recorded() as seen:
        engine = TransformersEngine(demo_dir, "demo")
        await engine.load()
        try:
            prompt = engine.chat_prompt(prompt_messages)
            sampled = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=40, seed=7)
            first, again = [await generate(engine, prompt, sampled) for _ in range(2)]
            stop = first[0][len(first[0]) // 2 :][:3]  # a stop string the seed is sure to reach
            stopped = await generate(engine, prompt, msgspec.structs.replace(sampled, stop=(stop,)))
            # Random weights: this prompt's greedy continuation decodes to text, not stray bytes.
            plain = "The quick brown fox"
            greedy = await generate(engine, plain, SamplingParams(max_tokens=16, temperature=0))
            reference = recompute_greedy(engine, plain, 16)
        finally:
            await engine.close()
    assert seen == [], "loading or generation warned (a deprecated transformers API?)"
    assert first == again
    assert stopped[:2] == (first[0][: first[0].index(stop)], "stop")
    assert greedy[0] == reference != ""


async def generate(engine: TransformersEngine, prompt: str, params: SamplingParams) -> Any:
    """(text, finish_reason, completion tokens) of one job."""
    job = engine.start(prompt, params)
    chunks = [c async for c in job]
    return "".join(c.text for c in chunks), chunks[-1].finish_reason, job.completion_tokens


def recompute_greedy(engine: TransformersEngine, prompt: str, tokens: int) -> str:
    """Greedy text without any cache: the whole sequence goes through the model at every step."""
    import torch

    ids = engine._encode(prompt)
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(tokens):
            logits = engine._model(
                input_ids=torch.tensor([ids + generated]), use_cache=False
            ).logits
            token = int(torch.argmax(logits[0, -1]))
            if token == engine._model.config.eos_token_id:
                break
            generated.append(token)
    # As the engine emits it: text ending in an incomplete UTF-8 sequence waits for more bytes.
    texts = (
        str(engine._tokenizer.decode(generated[:n], skip_special_tokens=True))
        for n in range(len(generated) + 1)
    )
    return [t for t in texts if not t.endswith("\ufffd")][-1]


async def test_logprobs_and_n_choices(nats_url: str, prefix: str, demo_dir: Path) -> None:
    """Chat logprobs (greedy: the model's own next-token distribution), streamed and not;
    completions logprobs with n=2 sampled choices, each its own seed (two slots: max_in_flight
    2, the engine runs them one after the other)."""
    import math

    import openai
    import torch

    async with running_worker(
        nats_url,
        prefix,
        register=False,
        engine="transformers",
        model_dir=str(demo_dir),
        models=("demo",),
        max_in_flight=2,
    ) as w:
        engine = w.service.models["demo"].engine
        client = openai.AsyncOpenAI(base_url=w.url + "/v1", api_key="unused", max_retries=0)
        ask: dict[str, Any] = {"model": "demo", "messages": MESSAGES, "max_tokens": 6}
        with warnings_recorded() as seen:
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
            text = await client.completions.create(
                model="demo", prompt="The quick brown fox", max_tokens=4, n=2, seed=5, logprobs=2
            )
            alone = await client.completions.create(
                model="demo", prompt="The quick brown fox", max_tokens=4, seed=6
            )
        await client.close()
    assert seen == []
    lp = full.choices[0].logprobs
    assert lp is not None
    assert lp.content is not None
    assert len(lp.content) == 6
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in lp.content]
    # every token's bytes, in order, spell the answer (the last may be part of a character the
    # answer leaves out until the rest comes)
    spelled = b"".join(bytes(t.bytes or []) for t in lp.content)
    assert spelled.startswith((full.choices[0].message.content or "").encode())
    # the first token's numbers are the model's: log_softmax of its logits after the prompt
    prompt = engine._encode(engine.chat_prompt([ChatMessage(**m) for m in MESSAGES]))
    with torch.inference_mode():
        logits = engine._model(input_ids=torch.tensor([prompt])).logits[0, -1]
    want = torch.log_softmax(logits.float(), dim=-1)
    first = lp.content[0]
    assert math.isclose(first.logprob, float(want.max()), abs_tol=1e-4)  # greedy: the likeliest
    assert [round(a.logprob, 4) for a in first.top_logprobs] == [
        round(v, 4) for v in torch.topk(want, 3).values.tolist()
    ]
    assert [c.index for c in text.choices] == [0, 1]
    assert text.choices[1].text == alone.choices[0].text  # choice 1 is seed 5 + 1
    assert text.usage is not None
    assert alone.usage is not None
    assert text.usage.prompt_tokens == alone.usage.prompt_tokens
    counted = 0
    for c in text.choices:
        assert c.logprobs is not None
        tokens, values = c.logprobs.tokens or [], c.logprobs.token_logprobs or []
        tops = c.logprobs.top_logprobs or []
        counted += len(tokens)
        for token, value, top in zip(tokens, values, tops, strict=True):
            assert value <= 0
            assert top[token] >= value  # there (a token that reads the same may be likelier)
            assert len(top) <= 3
    # an end-of-sequence token counts as generated but has no logprob entry
    assert counted <= text.usage.completion_tokens <= 8
