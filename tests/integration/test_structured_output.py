"""Structured output through a real router with the official openai client: a sim worker and a
transformers worker (the random-weight demo checkpoint) both answer in the schema's shape."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletionChunk

from tests.integration.fleet_fixtures import fleet

pytestmark = pytest.mark.integration

SIM, HF = "sim-model", "demo"
FAST = {"sim_max_context": 600, "sim_tokens_per_s": 1e6, "sim_ttft_s": 0.0, "models": (SIM,)}
HI: list[Any] = [{"role": "user", "content": "describe a worker"}]
OBJ: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "ok", "n"],
    "additionalProperties": False,
}
SCHEMA: Any = {"type": "json_schema", "json_schema": {"name": "obj", "schema": OBJ, "strict": True}}


class Obj(pydantic.BaseModel):
    """OBJ as the client's parse() helper builds it (a strict schema of its own making)."""

    name: str = pydantic.Field(max_length=6)
    ok: bool
    n: int = pydantic.Field(ge=0, le=99)


def valid(text: str) -> bool:
    """OBJ's rules, checked by hand (jsonschema is not a dependency)."""
    try:
        Obj.model_validate_json(text, strict=True)
    except pydantic.ValidationError:
        return False
    return set(json.loads(text)) == {"name", "ok", "n"}


@pytest.fixture
async def client(nats_url: str, prefix: str, demo_dir: Path) -> AsyncIterator[openai.AsyncOpenAI]:
    hf = {"engine": "transformers", "model_dir": str(demo_dir), "models": (HF,)}
    async with fleet(nats_url, prefix, [FAST, hf]) as (r, _):
        api = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)
        yield api
        await api.close()


@pytest.mark.parametrize(("model", "n"), [(SIM, 3), (HF, 1)])
async def test_json_schema_answers_parse_and_validate(
    client: openai.AsyncOpenAI, model: str, n: int
) -> None:
    for seed in range(2):
        got = await client.chat.completions.create(
            model=model, messages=HI, response_format=SCHEMA, n=n, seed=seed, max_tokens=100
        )
        assert len(got.choices) == n
        for choice in got.choices:
            assert choice.finish_reason == "stop"
            assert valid(choice.message.content or ""), choice.message.content


@pytest.mark.parametrize("model", [SIM, HF])
async def test_the_clients_parse_helper_gets_its_model(
    client: openai.AsyncOpenAI, model: str
) -> None:
    got = await client.chat.completions.parse(
        model=model, messages=HI, response_format=Obj, max_tokens=100, seed=3
    )
    parsed = got.choices[0].message.parsed
    assert isinstance(parsed, Obj)
    assert 0 <= parsed.n <= 99


async def streamed_text(
    stream: openai.AsyncStream[ChatCompletionChunk],
) -> tuple[str, list[str | None]]:
    """A one-choice stream's text, and every chunk's finish_reason."""
    text = ""
    reasons: list[str | None] = []
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reasons.append(choice.finish_reason)
    return text, reasons


@pytest.mark.parametrize("model", [SIM, HF])
async def test_streamed_json_is_whole_and_stops(client: openai.AsyncOpenAI, model: str) -> None:
    stream = await client.chat.completions.create(
        model=model, messages=HI, response_format=SCHEMA, stream=True, max_tokens=100, seed=5
    )
    text, reasons = await streamed_text(stream)
    assert valid(text), text
    assert [r for r in reasons if r] == ["stop"]


async def test_max_tokens_cuts_the_json_with_length(client: openai.AsyncOpenAI) -> None:
    got = await client.chat.completions.create(
        model=SIM, messages=HI, response_format=SCHEMA, max_tokens=4
    )
    assert got.choices[0].finish_reason == "length"
    assert got.choices[0].message.content == '{"na'


@pytest.mark.parametrize("model", [SIM, HF])
async def test_vllm_guided_extensions(client: openai.AsyncOpenAI, model: str) -> None:
    choice = await client.completions.create(
        model=model,
        prompt="is it?",
        max_tokens=10,
        extra_body={"guided_choice": ["yes", "no", "maybe"]},
    )
    assert choice.choices[0].text in ("yes", "no", "maybe")
    assert choice.choices[0].finish_reason == "stop"
    regex = await client.completions.create(
        model=model, prompt="code:", max_tokens=10, extra_body={"guided_regex": "[A-C]{3}-[0-9]"}
    )
    text = regex.choices[0].text
    assert re.fullmatch("[A-C]{3}-[0-9]", text), text


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "strin"}}},
            "type",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "a",
                    "strict": True,
                    "schema": {"type": "array", "uniqueItems": True},
                },
            },
            "uniqueItems",
        ),
        ({"type": "yaml"}, "response_format.type"),
    ],
)
async def test_an_impossible_format_is_refused_by_name(
    client: openai.AsyncOpenAI, response_format: Any, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model=SIM, messages=HI, response_format=response_format
        )
    assert (refused.value.code, refused.value.param) == ("invalid_value", "response_format")
    assert refused.value.type == "invalid_request_error"
    assert message in refused.value.message
