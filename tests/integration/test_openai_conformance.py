"""The official openai client through a real router to a sim worker: OpenAI's contract kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.helpers import eventually
from tests.integration.fleet_fixtures import fleet

pytestmark = pytest.mark.integration

CONTEXT = 600  # over the 256 tokens that once were the default max_tokens
FAST = {"sim_max_context": CONTEXT, "sim_tokens_per_s": 1e6, "sim_ttft_s": 0.0}
HI: list[Any] = [{"role": "user", "content": "hi there"}]


@pytest.fixture
async def client(nats_url: str, prefix: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with fleet(nats_url, prefix, [FAST | {"models": ("sim-model", "org/sim")}]) as (r, _):
        # max_retries=0: a refusal must reach the test as the client raises it
        api = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)
        yield api
        await api.close()


async def test_models_retrieve(client: openai.AsyncOpenAI) -> None:
    listed = (await client.models.list()).data
    assert [m.id for m in listed] == ["org/sim", "sim-model"]
    for card in listed:
        assert await client.models.retrieve(card.id) == card
        assert (card.object, card.owned_by) == ("model", "switchboard")
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("nope")
    assert (missing.value.code, missing.value.param) == ("model_not_found", "model")


async def test_non_text_parts_are_refused_by_name(client: openai.AsyncOpenAI) -> None:
    image: Any = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    text: Any = {"type": "text", "text": "what is this?"}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": [text, image]}]
        )
    assert refused.value.code == "unsupported_content"
    assert refused.value.param == "messages[0].content[1]"
    served = await client.chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": [text]}], max_tokens=3
    )
    assert served.choices[0].finish_reason == "length"


async def test_default_max_tokens_is_the_rest_of_the_context(client: openai.AsyncOpenAI) -> None:
    full = await client.chat.completions.create(model="sim-model", messages=HI)
    assert full.usage is not None
    assert full.usage.total_tokens == CONTEXT
    assert full.choices[0].finish_reason == "length"
    # a stop string ends it first; the sim's words repeat, so "the" comes within a few tokens
    stopped = await client.chat.completions.create(model="sim-model", messages=HI, stop=["the"])
    assert stopped.usage is not None
    assert stopped.usage.total_tokens < CONTEXT
    assert stopped.choices[0].finish_reason == "stop"
    text = await client.completions.create(model="sim-model", prompt="once upon a time")
    assert text.usage is not None
    assert text.usage.total_tokens == CONTEXT
    with pytest.raises(openai.BadRequestError) as full_prompt:
        await client.completions.create(model="sim-model", prompt="w " * CONTEXT)
    assert (full_prompt.value.code, full_prompt.value.param) == (
        "context_length_exceeded",
        "prompt",
    )


async def test_a_missing_field_is_named(client: openai.AsyncOpenAI) -> None:
    # the typed create() will not leave out a required argument; post() sends the raw body
    for path, field in (("/chat/completions", "messages"), ("/completions", "prompt")):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.post(path, body={"model": "sim-model"}, cast_to=ChatCompletion)
        assert (refused.value.code, refused.value.param) == ("invalid_value", field)


async def test_backpressure_is_a_503_the_client_would_retry(nats_url: str, prefix: str) -> None:
    """A full fleet answers 503 + Retry-After with type service_unavailable_error (docs/worker.md:
    why 503 and not 429); the client raises InternalServerError, and would retry it."""
    tight = FAST | {"max_in_flight": 1, "max_queue_depth": 0, "sim_tokens_per_s": 50.0}
    async with fleet(nats_url, prefix, [tight], ttft_target_s=0.5) as (router, (w,)):
        api = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        # straight to the worker, so the router's own gateway has room and forwards the next one
        direct = openai.AsyncOpenAI(base_url=w.url + "/v1", api_key="unused", max_retries=0)
        hog = asyncio.create_task(
            direct.chat.completions.create(model="sim-model", messages=HI, max_tokens=40)
        )
        await eventually(lambda: w.service.models["sim-model"].gate.core.in_flight == 1)
        with pytest.raises(openai.InternalServerError) as busy:
            await api.chat.completions.create(model="sim-model", messages=HI, max_tokens=1)
        assert busy.value.status_code == 503
        assert (busy.value.type, busy.value.code) == (
            "service_unavailable_error",
            "rate_limit_exceeded",
        )
        assert int(busy.value.response.headers["retry-after"]) >= 1
        # what the client does with it when it may retry (openai's own rule, as installed):
        # retried like a 429, after Retry-After
        assert api._should_retry(busy.value.response)
        await hog
        await api.close()
        await direct.close()


# ---- logprobs and n > 1, straight to a sim worker and through the router ----


@pytest.fixture(params=["router", "worker"])
async def api(
    request: pytest.FixtureRequest, nats_url: str, prefix: str
) -> AsyncIterator[openai.AsyncOpenAI]:
    async with fleet(nats_url, prefix, [FAST]) as (router, (worker,)):
        url = router.url if request.param == "router" else worker.url
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        yield client
        await client.close()


def check_chat_tokens(content: str, tokens: list[Any], k: int) -> None:
    """OpenAI's chat logprobs: one entry per token, spelling the content; k alternatives each,
    best first; the sim picks its likeliest token, so it heads them, with the same logprob."""
    assert "".join(t.token for t in tokens) == content
    for t in tokens:
        assert t.logprob <= 0
        assert bytes(t.bytes) == t.token.encode()
        assert len(t.top_logprobs) == k
        values = [alt.logprob for alt in t.top_logprobs]
        assert values == sorted(values, reverse=True)
        if k:
            assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob)


async def test_chat_logprobs_streamed_and_not(api: openai.AsyncOpenAI) -> None:
    ask: dict[str, Any] = {"model": "sim-model", "messages": HI, "max_tokens": 6, "seed": 3}
    full = await api.chat.completions.create(**ask, logprobs=True, top_logprobs=3)
    content = full.choices[0].message.content or ""
    lp = full.choices[0].logprobs
    assert lp is not None
    assert lp.content is not None
    assert len(lp.content) == 6
    check_chat_tokens(content, lp.content, 3)
    stream = await api.chat.completions.create(**ask, logprobs=True, top_logprobs=3, stream=True)
    streamed: list[Any] = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                assert choice.delta.content  # each token's entry comes with its text
                streamed.extend(choice.logprobs.content)
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in lp.content]
    only = await api.chat.completions.create(**ask, logprobs=True)  # top_logprobs: none
    assert only.choices[0].logprobs is not None
    assert only.choices[0].logprobs.content is not None
    check_chat_tokens(content, only.choices[0].logprobs.content, 0)
    plain = await api.chat.completions.create(**ask)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == content  # asking changes nothing else
    with pytest.raises(openai.BadRequestError) as refused:
        await api.chat.completions.create(**ask, top_logprobs=2)
    assert refused.value.param == "top_logprobs"


async def test_completions_logprobs_streamed_and_not(api: openai.AsyncOpenAI) -> None:
    ask: dict[str, Any] = {"model": "sim-model", "prompt": "once upon", "max_tokens": 5}
    full = await api.completions.create(**ask, logprobs=2)
    lp = full.choices[0].logprobs
    assert lp is not None
    assert lp.tokens is not None
    assert lp.token_logprobs is not None
    assert lp.top_logprobs is not None
    assert lp.text_offset is not None
    assert "".join(lp.tokens) == full.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0
        assert top[token] == value  # the sampled token is among them
        assert 1 <= len(top) <= 3  # two alternatives and the sampled one
    tokens: list[str] = []
    offsets: list[int] = []
    stream = await api.completions.create(**ask, logprobs=2, stream=True)
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs is not None:
                tokens.extend(choice.logprobs.tokens or [])
                offsets.extend(choice.logprobs.text_offset or [])
    assert (tokens, offsets) == (lp.tokens, lp.text_offset)  # offsets go on across chunks
    zero = await api.completions.create(**ask, logprobs=0)  # 0 asks for the sampled token's
    assert zero.choices[0].logprobs is not None
    assert zero.choices[0].logprobs.token_logprobs == lp.token_logprobs
    assert zero.choices[0].logprobs.top_logprobs == [
        {t: v} for t, v in zip(lp.tokens, lp.token_logprobs, strict=True)
    ]
    assert (await api.completions.create(**ask)).choices[0].logprobs is None


async def test_n_choices_streamed_and_not(api: openai.AsyncOpenAI) -> None:
    ask: dict[str, Any] = {"model": "sim-model", "messages": HI, "max_tokens": 5, "seed": 10}
    one = await api.chat.completions.create(**ask)
    assert one.usage is not None
    full = await api.chat.completions.create(**ask, n=3)
    assert [c.index for c in full.choices] == [0, 1, 2]
    texts = [c.message.content for c in full.choices]
    assert len(set(texts)) == 3  # each choice its own seed: seed + index
    assert texts[0] == one.choices[0].message.content
    for i in (1, 2):  # ... so each is reproducible alone
        alone = await api.chat.completions.create(**ask | {"seed": 10 + i})
        assert alone.choices[0].message.content == texts[i]
    assert full.usage is not None
    assert full.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert full.usage.completion_tokens == 3 * 5
    assert full.usage.total_tokens == one.usage.prompt_tokens + 15
    stream = await api.chat.completions.create(
        **ask, n=3, stream=True, stream_options={"include_usage": True}
    )
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    finish: dict[int, str | None] = {}
    roles: list[int] = []
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        assert len(chunk.choices) <= 1  # one choice's delta per chunk, as OpenAI streams them
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.index)
            pieces[choice.index].append(choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert sorted(roles) == [0, 1, 2]
    assert ["".join(pieces[i]) for i in range(3)] == texts
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (one.usage.prompt_tokens, 15)
    text = await api.completions.create(
        model="sim-model", prompt="once", max_tokens=3, n=2, seed=1, logprobs=1
    )
    assert [c.index for c in text.choices] == [0, 1]
    for c in text.choices:
        assert c.logprobs is not None
        assert c.logprobs.tokens is not None
        assert "".join(c.logprobs.tokens) == c.text
    assert text.usage is not None
    assert text.usage.completion_tokens == 6


async def test_n_is_refused_by_name_past_the_limits(api: openai.AsyncOpenAI) -> None:
    for n in (9, 200):  # past the worker's max_n (8); past OpenAI's own 128
        with pytest.raises(openai.BadRequestError) as refused:
            await api.chat.completions.create(model="sim-model", messages=HI, n=n)
        assert refused.value.param == "n"


async def test_best_of_answers_the_likeliest_candidates(api: openai.AsyncOpenAI) -> None:
    ask: dict[str, Any] = {"model": "sim-model", "prompt": "once upon", "max_tokens": 4}
    # the candidates are seeds 20, 21, 22; each alone, with what it is ranked by
    alone = [await api.completions.create(**ask, seed=20 + i, logprobs=0) for i in range(3)]

    def mean(c: Any) -> float:
        values = c.choices[0].logprobs.token_logprobs
        return float(sum(values) / len(values))

    ranked = sorted(alone, key=mean, reverse=True)
    got = await api.completions.create(**ask, seed=20, best_of=3, n=2)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [r.choices[0].text for r in ranked[:2]]
    assert all(c.logprobs is None for c in got.choices)  # ranked by them, not asked for them
    assert got.usage is not None
    assert got.usage.completion_tokens == 12
    with pytest.raises(openai.BadRequestError) as refused:
        await api.completions.create(**ask, best_of=3, stream=True)
    assert refused.value.param == "best_of"
