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
    async with fleet(nats_url, prefix, [tight]) as (router, (w,)):
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
