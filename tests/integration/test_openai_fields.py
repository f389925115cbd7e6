"""docs/worker.md's table of OpenAI request fields, driven with the official openai client through
a real router to a sim worker and a transformers worker (the demo checkpoint): each field is
served, accepted without effect, or refused by name, as the table says; and issue #18's items
(penalties and logit_bias, logprobs, n and best_of, the small gaps) on both engines, which
test_openai_conformance.py and test_worker_penalties.py check on the sim alone."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from schemas.inference import ChatMessage
from services.worker.engines.sim import VOCAB
from services.worker.engines.template import ChatOptions
from tests.integration.fleet_fixtures import fleet

pytestmark = pytest.mark.integration

SIM, HF = "sim-model", "demo"
MODELS = [SIM, HF]
SIM_WORKER = {"sim_max_context": 600, "sim_tokens_per_s": 1e6, "sim_ttft_s": 0.0}
HI: list[Any] = [{"role": "user", "content": "say hi"}]


@dataclass
class Speaker:
    """A model's tokens as a test names them: the sim's VOCAB words, or the demo's BPE."""

    tokenizer: Any = None  # None: the sim

    def ids(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return [VOCAB.index(w) for w in text.split()]
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(VOCAB[i] for i in ids)
        return str(self.tokenizer.decode(ids))

    @property
    def no_end(self) -> dict[str, int]:
        """A logit_bias that keeps the model from ending early (the sim never does)."""
        return {} if self.tokenizer is None else {str(self.tokenizer.eos_token_id): -100}


@dataclass
class Fleet:
    api: openai.AsyncOpenAI  # through the router
    workers: dict[str, Any]  # model -> its worker (Running[WorkerService])
    speakers: dict[str, Speaker]

    def engine(self, model: str) -> Any:
        return self.workers[model].service.models[model].engine


@contextlib.asynccontextmanager
async def started(
    nats_url: str,
    prefix: str,
    demo_dir: Path,
    sim: dict[str, Any],
    router: dict[str, Any] | None = None,
    **worker: Any,
) -> AsyncIterator[Fleet]:
    """A router (its config: router), a sim worker (SIM_WORKER | sim) and a transformers worker
    (worker: both workers' config)."""
    from transformers import AutoTokenizer

    hf = {"engine": "transformers", "model_dir": str(demo_dir), "models": (HF,)}
    sims = SIM_WORKER | {"models": (SIM,)} | sim
    workers = [sims | worker, hf | worker]
    async with fleet(nats_url, prefix, workers, **(router or {})) as (r, (s, h)):
        api = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)
        tokenizer = AutoTokenizer.from_pretrained(str(demo_dir), local_files_only=True)
        yield Fleet(api, {SIM: s, HF: h}, {SIM: Speaker(), HF: Speaker(tokenizer)})
        await api.close()


@pytest.fixture
async def fl(nats_url: str, prefix: str, demo_dir: Path) -> AsyncIterator[Fleet]:
    # three slots on transformers too (one sequence at a time there): n and best_of up to 3
    async with started(nats_url, prefix, demo_dir, {}, max_in_flight=3) as f:
        yield f


@pytest.fixture
async def sim_api(nats_url: str, prefix: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """A router and a sim worker only (what the sim alone can show)."""
    async with fleet(nats_url, prefix, [SIM_WORKER | {"models": (SIM,)}]) as (router, _):
        api = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        yield api
        await api.close()


async def content(api: openai.AsyncOpenAI, model: str, **ask: Any) -> str:
    """A greedy chat answer's text."""
    base: dict[str, Any] = {"messages": HI, "temperature": 0}
    got = await api.chat.completions.create(model=model, **base | ask)
    return got.choices[0].message.content or ""


async def refusal(call: Any) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as refused:
        await call
    return refused.value


# ---- the table: refused by name, accepted without effect ----

REFUSED_CHAT: list[tuple[str, Any]] = [
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
    ("function_call", {"name": "f"}),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("web_search_options", {}),
    ("reasoning_effort", "low"),
    ("verbosity", "low"),
    ("moderation", {"model": "omni-moderation-latest", "policy": {"input": {"mode": "block"}}}),
    ("chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}"),  # code: not run
]
REFUSED_TEXT: list[tuple[str, Any]] = [("echo", True), ("suffix", "and so on")]


@pytest.mark.parametrize("model", MODELS)
async def test_fields_no_engine_has_are_refused_by_name(fl: Fleet, model: str) -> None:
    for field, value in REFUSED_CHAT:
        ask: dict[str, Any] = {"model": model, "messages": HI, "max_tokens": 1}
        err = await refusal(fl.api.chat.completions.create(**ask, extra_body={field: value}))
        assert (err.code, err.param, err.type) == (
            "unsupported_parameter",
            field,
            "invalid_request_error",
        ), field
    for field, value in REFUSED_TEXT:
        text: dict[str, Any] = {"model": model, "prompt": "x", "max_tokens": 1}
        err = await refusal(fl.api.completions.create(**text, extra_body={field: value}))
        assert (err.code, err.param) == ("unsupported_parameter", field), field


# Sent by clients that fill every field, or bookkeeping for OpenAI's platform: served, and the
# answer is the one the same request without them gets.
NEUTRAL_CHAT: dict[str, Any] = {
    "functions": [],
    "function_call": "auto",
    "tool_choice": "none",
    "parallel_tool_calls": True,
    "response_format": {"type": "text"},
    "modalities": ["text"],
    "verbosity": "medium",
    "logprobs": False,
    "top_logprobs": 0,
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "stream_options": {"include_usage": True},  # without stream: nothing to add it to
    "user": "u-1",
    "safety_identifier": "s-1",
    "metadata": {"team": "a"},
    "store": True,
    "service_tier": "priority",
    "prediction": {"type": "content", "content": "hello there"},
    "prompt_cache_key": "k",
    "prompt_cache_retention": "24h",
}
NEUTRAL_TEXT: dict[str, Any] = {"echo": False, "suffix": "", "best_of": 1, "user": "u-1"}


@pytest.mark.parametrize("model", MODELS)
async def test_neutral_and_bookkeeping_fields_change_nothing(fl: Fleet, model: str) -> None:
    ask: dict[str, Any] = {"model": model, "max_tokens": 5, "temperature": 0}
    plain = await fl.api.chat.completions.create(messages=HI, **ask)
    same = await fl.api.chat.completions.create(messages=HI, **ask, extra_body=NEUTRAL_CHAT)
    assert same.choices[0].message.content == plain.choices[0].message.content
    assert same.usage == plain.usage
    assert same.choices[0].logprobs is None
    text: dict[str, Any] = ask | {"prompt": "once upon"}
    plain_text = await fl.api.completions.create(**text)
    same_text = await fl.api.completions.create(**text, extra_body=NEUTRAL_TEXT)
    assert same_text.choices[0].text == plain_text.choices[0].text


@pytest.mark.parametrize("model", MODELS)
async def test_roles_and_prompt_forms(fl: Fleet, model: str) -> None:
    messages: list[Any] = [
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": [{"type": "text", "text": "be kind"}]},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    got = await fl.api.chat.completions.create(model=model, messages=messages, max_tokens=2)
    assert got.usage is not None
    assert got.usage.completion_tokens >= 1
    listed = await fl.api.completions.create(model=model, prompt=["once"], max_tokens=2, seed=1)
    alone = await fl.api.completions.create(model=model, prompt="once", max_tokens=2, seed=1)
    assert listed.choices[0].text == alone.choices[0].text
    for prompt in (["one", "two"], [1, 2, 3]):  # several prompts; token ids
        err = await refusal(fl.api.completions.create(model=model, prompt=prompt, max_tokens=1))
        assert (err.code, err.param) == ("invalid_value", "prompt"), prompt


@pytest.mark.parametrize("model", MODELS)
async def test_sampling_fields(fl: Fleet, model: str) -> None:
    no_end = fl.speakers[model].no_end
    ask: dict[str, Any] = {"model": model, "messages": HI, "logit_bias": no_end}
    plain = await content(fl.api, **ask, max_tokens=8)
    # max_completion_tokens wins over max_tokens
    got = await fl.api.chat.completions.create(
        **ask, temperature=0, max_tokens=8, max_completion_tokens=2
    )
    assert (got.usage and got.usage.completion_tokens) == 2
    # stop: the answer ends where the stop string would begin
    cut = len(plain) // 2
    stop = plain[cut : cut + 3]
    stopped = await fl.api.chat.completions.create(
        **ask, temperature=0, max_tokens=8, stop=[stop, "never"]
    )
    assert stopped.choices[0].message.content == plain[: plain.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    # seeded sampling is reproducible, and top_p / top_k (vLLM's) are served
    knobs: dict[str, Any] = {"temperature": 1.5, "top_p": 0.9, "extra_body": {"top_k": 40}}
    one = await content(fl.api, **ask, max_tokens=8, seed=7, **knobs)
    assert await content(fl.api, **ask, max_tokens=8, seed=7, **knobs) == one
    for field, value in (("temperature", 2.5), ("top_p", 0), ("top_k", -1)):
        err = await refusal(content(fl.api, model=model, max_tokens=1, extra_body={field: value}))
        assert (err.code, err.param) == ("invalid_value", field)


# ---- #18 item 1: penalties and logit_bias ----


@pytest.mark.parametrize("model", MODELS)
async def test_logit_bias_forces_and_bans(fl: Fleet, model: str) -> None:
    speak = fl.speakers[model]
    first = speak.ids(await content(fl.api, model, max_tokens=1))
    assert len(first) == 1
    forced = speak.ids("fleet" if model == SIM else "Switchboard")[0]
    assert forced != first[0]
    answer = await content(fl.api, model, max_tokens=4, logit_bias={str(forced): 100})
    assert answer == speak.text([forced] * 4)
    banned = await content(fl.api, model, max_tokens=4, logit_bias={str(first[0]): -100})
    assert speak.ids(banned)[:1] != first
    vocab = fl.engine(model).vocab_size
    for key in (str(vocab), "-1", "fleet"):
        err = await refusal(content(fl.api, model, max_tokens=1, logit_bias={key: 1}))
        assert (err.code, err.param) == ("invalid_value", "logit_bias")


@pytest.mark.parametrize("model", MODELS)
async def test_penalties_break_repetition(fl: Fleet, model: str) -> None:
    speak = fl.speakers[model]
    # the demo model's greedy answer repeats its first token; the sim's words repeat once its
    # vocabulary is spent
    n = 8 if model == HF else len(VOCAB) + 4
    plain = speak.ids(await content(fl.api, model, max_tokens=n))
    assert len(set(plain)) < len(plain)
    for knob in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        penalized = speak.ids(await content(fl.api, model, max_tokens=n, extra_body={knob: 2}))
        assert penalized != plain, knob
        if model == SIM and knob != "repetition_penalty":  # a used word's logit (< 1 - 2)
            assert len(set(penalized[: len(VOCAB)])) == len(VOCAB), knob  # loses to any other
        if model == HF:
            assert penalized[:1] == plain[:1], knob  # nothing generated yet: the same first
            assert penalized[1:2] != plain[:1], knob  # then not that one again
    for field, value in (("presence_penalty", 2.5), ("repetition_penalty", 0)):
        err = await refusal(content(fl.api, model, max_tokens=1, extra_body={field: value}))
        assert (err.code, err.param) == ("invalid_value", field)


# ---- #18 item 2: logprobs ----


@pytest.mark.parametrize("model", MODELS)
async def test_logprobs_chat_and_text(fl: Fleet, model: str) -> None:
    ask: dict[str, Any] = {"model": model, "messages": HI, "max_tokens": 5, "temperature": 0}
    ask["logit_bias"] = fl.speakers[model].no_end
    full = await fl.api.chat.completions.create(**ask, logprobs=True, top_logprobs=3)
    lp = full.choices[0].logprobs
    assert lp is not None
    assert lp.content is not None
    assert len(lp.content) == 5
    for t in lp.content:  # greedy: the sampled token is the likeliest, alternatives best first
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 3
        assert math.isclose(t.logprob, t.top_logprobs[0].logprob, abs_tol=1e-4)
        values = [a.logprob for a in t.top_logprobs]
        assert values == sorted(values, reverse=True)
    spelled = b"".join(bytes(t.bytes or []) for t in lp.content)
    assert spelled.startswith((full.choices[0].message.content or "").encode())
    stream = await fl.api.chat.completions.create(**ask, logprobs=True, top_logprobs=3, stream=True)
    streamed = [
        t
        async for chunk in stream
        for c in chunk.choices
        for t in (c.logprobs.content or [] if c.logprobs else [])
    ]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in lp.content]
    err = await refusal(fl.api.chat.completions.create(**ask, top_logprobs=2))
    assert err.param == "top_logprobs"
    text: dict[str, Any] = {"model": model, "prompt": "once upon", "max_tokens": 4, "seed": 2}
    text["logit_bias"] = fl.speakers[model].no_end
    whole = await fl.api.completions.create(**text, logprobs=2)
    tlp = whole.choices[0].logprobs
    assert tlp is not None
    assert tlp.tokens is not None
    assert tlp.token_logprobs is not None
    assert tlp.top_logprobs is not None
    assert len(tlp.tokens) == len(tlp.token_logprobs) == len(tlp.top_logprobs) == 4
    assert tlp.text_offset == [sum(map(len, tlp.tokens[:i])) for i in range(4)]
    for token, value, top in zip(tlp.tokens, tlp.token_logprobs, tlp.top_logprobs, strict=True):
        assert value <= 0
        assert top[token] >= value  # there (two tokens that read the same keep the likelier)
        assert 1 <= len(top) <= 3
    tokens: list[str] = []
    async for chunk in await fl.api.completions.create(**text, logprobs=2, stream=True):
        for choice in chunk.choices:
            tokens.extend(choice.logprobs.tokens or [] if choice.logprobs else [])
    assert tokens == tlp.tokens
    err = await refusal(fl.api.completions.create(**text, logprobs=6))
    assert err.param == "logprobs"


# ---- #18 item 3: n and best_of ----


@pytest.mark.parametrize("model", MODELS)
async def test_n_choices_and_best_of(fl: Fleet, model: str) -> None:
    no_end = fl.speakers[model].no_end
    ask: dict[str, Any] = {"model": model, "messages": HI, "max_tokens": 3, "logit_bias": no_end}
    full = await fl.api.chat.completions.create(**ask, n=3, seed=5)
    assert [c.index for c in full.choices] == [0, 1, 2]
    alone = await fl.api.chat.completions.create(**ask, seed=7)
    assert full.choices[2].message.content == alone.choices[0].message.content  # seed + index
    assert full.usage is not None
    assert alone.usage is not None
    assert full.usage.prompt_tokens == alone.usage.prompt_tokens  # the prompt counts once
    assert full.usage.completion_tokens == 9
    stream = await fl.api.chat.completions.create(
        **ask, n=3, seed=5, stream=True, stream_options={"include_usage": True}
    )
    pieces: dict[int, str] = {0: "", 1: "", 2: ""}
    async for chunk in stream:
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
    assert [pieces[i] for i in range(3)] == [c.message.content for c in full.choices]
    text: dict[str, Any] = {"model": model, "prompt": "once upon", "max_tokens": 3}
    text["logit_bias"] = no_end

    def mean(c: Any) -> float:
        values = c.choices[0].logprobs.token_logprobs
        return float(sum(values) / len(values))

    # best_of 3 with seed s runs seeds s, s+1, s+2: each alone, with what it is ranked by; s
    # such that the first candidate is not the likeliest (answering it would be no ranking)
    each = {s: await fl.api.completions.create(**text, seed=s, logprobs=0) for s in range(20, 30)}

    def best(r: range) -> int:
        return max(r, key=lambda s: mean(each[s]))

    seeds = next(r for r in (range(s, s + 3) for s in range(20, 28)) if r[0] != best(r))

    got = await fl.api.completions.create(**text, seed=seeds[0], best_of=3)
    assert [c.text for c in got.choices] == [each[best(seeds)].choices[0].text]
    assert got.usage is not None
    assert got.usage.completion_tokens == 9  # every candidate's tokens
    limit = 4 if model == HF else 9  # past the model's slots (3) / the worker's max_n (8)
    err = await refusal(fl.api.chat.completions.create(**ask, n=limit))
    assert err.param == "n"
    err = await refusal(fl.api.completions.create(**text, best_of=2, stream=True))
    assert err.param == "best_of"


# ---- #18 item 6: the small gaps ----


def filling(engine: Any, room: int) -> str:
    """A user message whose chat prompt leaves `room` tokens of the engine's context."""
    target = int(engine.limits.max_context) - room

    def tokens(words: int) -> int:
        message = ChatMessage(role="user", content="fox " * words)
        return int(engine.count_tokens(engine.chat_prompt([message])))

    words = target // 2
    for _ in range(20):  # about one token a word: a few steps
        have = tokens(words)
        if have == target:
            return "fox " * words
        words += max(1, (target - have) // 2) if have < target else -1
    raise AssertionError(f"no prompt of {target} tokens")


@pytest.mark.parametrize("model", MODELS)
async def test_small_gaps(fl: Fleet, model: str) -> None:
    card = await fl.api.models.retrieve(model)
    assert (card.id, card.object, card.owned_by) == (model, "model", "switchboard")
    with pytest.raises(openai.NotFoundError) as missing:
        await fl.api.chat.completions.create(model=model + "-nope", messages=HI)
    assert (missing.value.code, missing.value.param) == ("model_not_found", "model")
    image: Any = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    parts: Any = [{"type": "text", "text": "what is this?"}, image]
    err = await refusal(
        fl.api.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}])
    )
    assert (err.code, err.param) == ("unsupported_content", "messages[0].content[1]")
    for path, field in (("/chat/completions", "messages"), ("/completions", "prompt")):
        err = await refusal(fl.api.post(path, body={"model": model}, cast_to=ChatCompletion))
        assert (err.code, err.param) == ("invalid_value", field)
    # no max_tokens: the rest of the context
    engine = fl.engine(model)
    messages: Any = [{"role": "user", "content": filling(engine, 4)}]
    no_end = fl.speakers[model].no_end
    rest = await fl.api.chat.completions.create(model=model, messages=messages, logit_bias=no_end)
    assert rest.usage is not None
    assert (rest.usage.completion_tokens, rest.usage.total_tokens) == (4, engine.limits.max_context)
    assert rest.choices[0].finish_reason == "length"
    err = await refusal(
        fl.api.chat.completions.create(model=model, messages=messages, max_tokens=5)
    )
    assert (err.code, err.param) == ("context_length_exceeded", "max_tokens")


async def test_unknown_paths_and_methods_answer_in_the_envelope(
    sim_api: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await sim_api.get("/nope", cast_to=ChatCompletion)
    assert (missing.value.code, missing.value.type) == ("not_found", "invalid_request_error")
    with pytest.raises(openai.APIStatusError) as wrong:
        await sim_api.get("/chat/completions", cast_to=ChatCompletion)
    assert (wrong.value.status_code, wrong.value.code) == (405, "method_not_allowed")


@pytest.mark.parametrize("model", MODELS)
async def test_backpressure_is_a_503_the_client_would_retry(
    nats_url: str, prefix: str, demo_dir: Path, model: str
) -> None:
    """With each model's one slot taken, the next request through the router is the busy 503
    (docs/worker.md, "Backpressure"), whatever the engine. The router hears of the full slot
    in the worker's heartbeat and answers it itself; the worker's own 503 has the same type
    and code (test_openai_conformance.py's hog can reach it before the heartbeat does)."""
    tight = {"max_in_flight": 1, "max_queue_depth": 0}
    # the router waits at most this for room before its own (same) 503
    async with started(nats_url, prefix, demo_dir, {}, {"ttft_target_s": 0.5}, **tight) as f:
        served = f.workers[model].service.models[model]
        async with served.slots(1):  # the one slot, held as a running request holds it
            with pytest.raises(openai.InternalServerError) as busy:
                await f.api.chat.completions.create(model=model, messages=HI, max_tokens=1)
        assert busy.value.status_code == 503
        assert (busy.value.type, busy.value.code) == (
            "service_unavailable_error",
            "rate_limit_exceeded",
        )
        assert int(busy.value.response.headers["retry-after"]) >= 1
        assert f.api._should_retry(busy.value.response)  # openai's own rule: retried


# ---- found while writing the table (were answered as if not asked): now served or refused ----

# vLLM's extensions no engine here has: refused by name unless neutral.
REFUSED_VLLM: list[tuple[str, Any]] = [
    ("bad_words", ["fleet"]),
    ("prompt_logprobs", 1),
    ("use_beam_search", True),
]


@pytest.mark.parametrize("model", MODELS)
async def test_vllm_extensions_no_engine_has_are_refused_by_name(fl: Fleet, model: str) -> None:
    for field, value in REFUSED_VLLM:
        err = await refusal(content(fl.api, model, max_tokens=2, extra_body={field: value}))
        assert (err.code, err.param) == ("unsupported_parameter", field), field
        text: dict[str, Any] = {"model": model, "prompt": "x", "max_tokens": 1}
        err = await refusal(fl.api.completions.create(**text, extra_body={field: value}))
        assert (err.code, err.param) == ("unsupported_parameter", field), field
    neutral: dict[str, Any] = {"bad_words": [], "prompt_logprobs": None, "use_beam_search": False}
    assert await content(fl.api, model, max_tokens=3, extra_body=neutral) == await content(
        fl.api, model, max_tokens=3
    )


@pytest.mark.parametrize("model", MODELS)
async def test_stop_token_ids_and_min_tokens(fl: Fleet, model: str) -> None:
    speak = fl.speakers[model]
    ask: dict[str, Any] = {"model": model, "messages": HI, "temperature": 0, "max_tokens": 4}
    ask["logit_bias"] = speak.no_end
    plain = speak.ids(await content(fl.api, **ask))
    # the first token is a stop token: the answer ends there, its text left out
    stop = {"stop_token_ids": [plain[0]]}
    got = await fl.api.chat.completions.create(**ask, extra_body=stop)
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == ("", "stop")
    assert got.usage is not None
    assert got.usage.completion_tokens == 1
    # ... which min_tokens holds back: another first token
    held = speak.ids(await content(fl.api, **ask, extra_body=stop | {"min_tokens": 2}))
    assert held
    assert held[0] != plain[0]
    for extra, param in (
        ({"stop_token_ids": [fl.engine(model).vocab_size]}, "stop_token_ids"),
        ({"min_tokens": 5}, "min_tokens"),  # past max_tokens
        ({"min_tokens": 1, "stop": ["x"]}, "min_tokens"),
    ):
        err = await refusal(fl.api.chat.completions.create(**ask, extra_body=extra))
        assert err.param == param, extra


async def test_min_tokens_and_ignore_eos_hold_the_end_token_back(fl: Fleet) -> None:
    """The demo model's end token, forced by logit_bias, ends the answer at once; min_tokens
    holds it back that many tokens, and ignore_eos makes it an ordinary token."""
    eos = fl.speakers[HF].tokenizer.eos_token_id
    ask: dict[str, Any] = {"model": HF, "messages": HI, "temperature": 0, "max_tokens": 6}
    ask["logit_bias"] = {str(eos): 100}
    usage: dict[str, tuple[int, str | None]] = {}
    for name, extra in (
        ("plain", {}),
        ("min", {"min_tokens": 3}),
        ("ignore", {"ignore_eos": True}),
    ):
        got = await fl.api.chat.completions.create(**ask, extra_body=extra)
        assert got.usage is not None
        usage[name] = (got.usage.completion_tokens, got.choices[0].finish_reason)
    assert usage == {"plain": (1, "stop"), "min": (4, "stop"), "ignore": (6, "length")}


@pytest.mark.parametrize("model", MODELS)
async def test_min_p(fl: Fleet, model: str) -> None:
    """min_p 1 keeps only the likeliest token: sampling is then greedy, and each token's logprob
    (of the distribution sampled from) is 0."""
    ask: dict[str, Any] = {"model": model, "messages": HI, "max_tokens": 5, "seed": 3}
    ask["logit_bias"] = fl.speakers[model].no_end
    greedy = await content(fl.api, **ask)
    sharp = await fl.api.chat.completions.create(
        **ask, temperature=1.0, logprobs=True, extra_body={"min_p": 1.0}
    )
    assert sharp.choices[0].message.content == greedy
    lp = sharp.choices[0].logprobs
    assert lp is not None
    assert lp.content is not None
    assert [round(t.logprob, 4) for t in lp.content] == [0.0] * 5
    loose = await fl.api.chat.completions.create(**ask, temperature=1.0, logprobs=True)
    assert loose.choices[0].logprobs is not None
    assert any(t.logprob < -1e-3 for t in loose.choices[0].logprobs.content or [])
    err = await refusal(content(fl.api, model, max_tokens=1, extra_body={"min_p": 1.5}))
    assert (err.code, err.param) == ("invalid_value", "min_p")


@pytest.mark.parametrize("model", MODELS)
async def test_structured_outputs_is_served_as_guided(fl: Fleet, model: str) -> None:
    """vLLM >= 0.10's structured_outputs, on both APIs."""
    so = {"structured_outputs": {"choice": ["yes", "no"]}}
    assert await content(fl.api, model, max_tokens=5, extra_body=so) in ("yes", "no")
    text = await fl.api.completions.create(model=model, prompt="ok?", max_tokens=5, extra_body=so)
    assert text.choices[0].text in ("yes", "no")
    bad = {"structured_outputs": {"structural_tag": "{}"}}
    err = await refusal(content(fl.api, model, max_tokens=5, extra_body=bad))
    assert (err.code, err.param) == ("invalid_value", "structured_outputs")


@pytest.mark.parametrize("model", MODELS)
async def test_completions_response_format_is_served(fl: Fleet, model: str) -> None:
    """vLLM serves response_format on completions too."""
    ask: dict[str, Any] = {"model": model, "prompt": "json please", "max_tokens": 60}
    json_object = {"response_format": {"type": "json_object"}}
    got = await fl.api.completions.create(**ask, extra_body=json_object)
    answer = got.choices[0].text
    assert answer.startswith("{")
    if got.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer), dict)
    err = await refusal(
        fl.api.completions.create(**ask, extra_body={"response_format": {"type": "xml"}})
    )
    assert (err.code, err.param) == ("invalid_value", "response_format")


# Optional in openai's own types (and null is OpenAI's "the default"); the client sends a None
# argument as null.
NULLABLE = ["temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "stream"]


@pytest.mark.parametrize("field", NULLABLE)
async def test_null_means_the_default(fl: Fleet, field: str) -> None:
    """To the worker itself and through the router (whose RoutingFields read null too)."""
    worker = fl.workers[SIM]
    api = openai.AsyncOpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0)
    async with api:
        plain = await content(api, SIM, max_tokens=2, seed=1)
        assert await content(api, SIM, max_tokens=2, seed=1, **{field: None}) == plain
        assert await content(fl.api, SIM, max_tokens=2, seed=1, **{field: None}) == plain
        text: dict[str, Any] = {"model": SIM, "prompt": "once", "max_tokens": 2, "seed": 1}
        alone = await api.completions.create(**text)
        nulled = await api.completions.create(**text, extra_body={field: None, "echo": None})
        assert nulled.choices[0].text == alone.choices[0].text


# ---- vLLM's decoding and chat-template fields ----


@pytest.mark.parametrize("model", MODELS)
async def test_include_stop_str_in_output(fl: Fleet, model: str) -> None:
    """The stop string, or a stop_token_ids token's text, stays in the answer; both APIs."""
    speak = fl.speakers[model]
    ask: dict[str, Any] = {"model": model, "messages": HI, "temperature": 0, "max_tokens": 8}
    ask["logit_bias"] = speak.no_end
    plain = await content(fl.api, **ask)
    stop = plain[len(plain) // 2 :][:2]
    at = plain.index(stop)
    keep = {"include_stop_str_in_output": True}
    assert await content(fl.api, **ask, stop=[stop]) == plain[:at]
    assert await content(fl.api, **ask, stop=[stop], extra_body=keep) == plain[: at + len(stop)]
    ids = speak.ids(plain)
    ended = {"stop_token_ids": [ids[0]]}
    assert await content(fl.api, **ask, extra_body=ended) == ""
    assert await content(fl.api, **ask, extra_body=ended | keep) == speak.text(ids[:1])
    text: dict[str, Any] = {"model": model, "prompt": "once upon", "max_tokens": 8}
    text |= {"temperature": 0, "logit_bias": speak.no_end}
    whole = (await fl.api.completions.create(**text)).choices[0].text
    stop = whole[len(whole) // 2 :][:2]
    at = whole.index(stop)
    got = await fl.api.completions.create(**text, stop=[stop], extra_body=keep)
    assert got.choices[0].text == whole[: at + len(stop)]
    assert got.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("model", MODELS)
async def test_skip_special_tokens(fl: Fleet, model: str) -> None:
    """false: special tokens' text is part of the answer (the demo's <|user|>, forced); the sim
    has none, so it answers the same."""
    speak = fl.speakers[model]
    ask: dict[str, Any] = {"model": model, "messages": HI, "temperature": 0, "max_tokens": 2}
    if model == HF:
        special = speak.tokenizer.convert_tokens_to_ids("<|user|>")
        ask["logit_bias"] = {str(special): 100}
    skipped = await content(fl.api, **ask)
    kept = await content(fl.api, **ask, extra_body={"skip_special_tokens": False})
    if model == HF:
        assert (skipped, kept) == ("", "<|user|><|user|>")
    else:
        assert kept == skipped
    assert await content(fl.api, **ask, extra_body={"skip_special_tokens": True}) == skipped


SAID: list[Any] = [
    {"role": "user", "content": "say hi"},
    {"role": "assistant", "content": "the fleet"},
]


def prompt_tokens(engine: Any, options: ChatOptions) -> int:
    said = [ChatMessage(**m) for m in SAID]
    return int(engine.count_tokens(engine.chat_prompt(said, options)))


@pytest.mark.parametrize("model", MODELS)
async def test_chat_template_controls(fl: Fleet, model: str) -> None:
    """add_generation_prompt, continue_final_message and chat_template_kwargs shape the prompt
    (its usage is the engine's count of that prompt); a reply that continues the last message
    has its role; echo starts every choice with it, streamed too."""
    engine = fl.engine(model)
    ask: dict[str, Any] = {"model": model, "messages": SAID, "temperature": 0, "max_tokens": 3}
    ask["logit_bias"] = fl.speakers[model].no_end
    going = {"add_generation_prompt": False, "continue_final_message": True}
    cases: list[tuple[dict[str, Any], ChatOptions]] = [
        ({}, ChatOptions()),
        ({"add_generation_prompt": False}, ChatOptions(add_generation_prompt=False)),
        (going, ChatOptions(add_generation_prompt=False, continue_final_message=True)),
        (
            {"chat_template_kwargs": going | {"unused": 1}},
            ChatOptions(add_generation_prompt=False, continue_final_message=True),
        ),
    ]
    counts = []
    for extra, options in cases:
        got = await fl.api.chat.completions.create(**ask, extra_body=extra)
        assert got.usage is not None
        assert got.usage.prompt_tokens == prompt_tokens(engine, options), extra
        counts.append(got.usage.prompt_tokens)
    assert counts[0] != counts[2]
    more = await content(fl.api, **ask, extra_body=going)
    echoed = await content(fl.api, **ask, extra_body=going | {"echo": True})
    assert echoed == "the fleet" + more
    stream = await fl.api.chat.completions.create(
        **ask, n=2, stream=True, extra_body=going | {"echo": True}
    )
    texts = ["", ""]
    async for chunk in stream:
        for c in chunk.choices:
            assert c.delta.role in (None, "assistant")
            texts[c.index] += c.delta.content or ""
    assert texts == [echoed, echoed]
    raw = await fl.api.chat.completions.with_raw_response.create(
        model=model, messages=HI, max_tokens=1, extra_body={"add_generation_prompt": False}
    )
    assert json.loads(raw.text)["choices"][0]["message"]["role"] == "user"  # vLLM's rule
    for extra, param in (
        ({"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ):
        err = await refusal(fl.api.chat.completions.create(**ask, extra_body=extra))
        assert (err.code, err.param) == ("invalid_value", param), extra


@pytest.mark.parametrize("model", MODELS)
async def test_guided_whitespace_pattern(fl: Fleet, model: str) -> None:
    """Served with a JSON constraint (the answer is JSON all the same); refused without one."""
    ask: dict[str, Any] = {"model": model, "messages": HI, "max_tokens": 40, "temperature": 0}
    spaced = {"response_format": {"type": "json_object"}, "guided_whitespace_pattern": "[ ]?"}
    got = await fl.api.chat.completions.create(**ask, extra_body=spaced)
    answer = got.choices[0].message.content or ""
    assert answer.startswith("{")
    if got.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer), dict)
    err = await refusal(
        fl.api.chat.completions.create(**ask, extra_body={"guided_whitespace_pattern": " "})
    )
    assert (err.code, err.param) == ("invalid_value", "guided_whitespace_pattern")
