"""Tool calling with the official openai client through a real router, to a sim worker and to a
transformers worker serving the demo checkpoint: tools rendered by the model's chat template,
"required" and named functions forced by the grammar, calls whole and streamed as OpenAI
shapes them, tool results accepted in the history, and refusals named."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.fleet_fixtures import fleet
from tests.unit.test_template import HISTORY
from tests.unit.test_tools import TIME, WEATHER

pytestmark = pytest.mark.integration

FAST = {"sim_tokens_per_s": 1e6, "sim_ttft_s": 0.0}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS: list[Any] = [WEATHER, TIME]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}
MODELS = ["sim-model", "demo"]


@pytest.fixture
async def api(nats_url: str, prefix: str, demo_dir: Path) -> AsyncIterator[openai.AsyncOpenAI]:
    hf = {"engine": "transformers", "model_dir": str(demo_dir), "models": ("demo",)}
    async with fleet(nats_url, prefix, [FAST, hf]) as (router, _):
        client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        yield client
        await client.close()


def check_call(call: Any, names: set[str]) -> None:
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert args in ({"city": "Paris"}, {"city": "Nice"})  # the schema's enum, enforced
    else:
        assert args == {}


async def streamed_calls(
    api: openai.AsyncOpenAI, pieces: list[int] | None = None, **ask: Any
) -> tuple[list[tuple[str, str, str]], str | None]:
    """Accumulate streamed tool-call deltas as a client does; check OpenAI's delta order.
    pieces: filled with how many argument deltas (non-empty) each call came in."""
    stream = await api.chat.completions.create(**ask, stream=True)
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:  # the first delta of a call: id, type, name
                    assert delta.id is not None
                    assert delta.type == "function"
                    assert delta.function is not None
                    assert delta.function.name is not None
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "args": ""}
                assert delta.function is not None
                calls[delta.index]["args"] += delta.function.arguments or ""
                calls[delta.index]["pieces"] = calls[delta.index].get("pieces", 0) + bool(
                    delta.function.arguments
                )
    assert sorted(calls) == list(range(len(calls)))
    if pieces is not None:
        pieces.extend(c["pieces"] for _, c in sorted(calls.items()))
    out = [(c["id"], c["name"], c["args"]) for _, c in sorted(calls.items())]
    return out, finish


async def forced_calls(api: openai.AsyncOpenAI, base: dict[str, Any]) -> list[tuple[str, str]]:
    """`required` (seed 1) and a named function (seed 2) each answer with valid calls only (the
    grammar forces them on any model); the required answer's calls (name, arguments), for its
    caller's checks."""
    required = await api.chat.completions.create(**base, tool_choice="required", seed=1)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        check_call(call, {"get_weather", "get_time"})
    named = await api.chat.completions.create(
        **base, tool_choice=NAMED, parallel_tool_calls=False, seed=2
    )
    calls = named.choices[0].message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    check_call(calls[0], {"get_weather"})
    return [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


@pytest.mark.parametrize("model", MODELS)
async def test_required_and_named_calls_are_forced(api: openai.AsyncOpenAI, model: str) -> None:
    base: dict[str, Any] = {"model": model, "messages": ASK, "tools": TOOLS, "max_tokens": 700}
    want = await forced_calls(api, base)
    # streamed: the same calls (same seed), as deltas, the arguments as they are generated
    pieces: list[int] = []
    got, finish = await streamed_calls(api, pieces, **base, tool_choice="required", seed=1)
    assert finish == "tool_calls"
    assert max(pieces) > 1
    assert [(name, args) for _, name, args in got] == want
    assert all(call_id.startswith("call_") for call_id, _, _ in got)


async def test_each_choice_reads_its_own_calls(api: openai.AsyncOpenAI) -> None:
    got = await api.chat.completions.create(
        model="sim-model", messages=ASK, tools=TOOLS, tool_choice=NAMED, n=3, seed=5
    )
    assert [c.index for c in got.choices] == [0, 1, 2]
    for choice in got.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls is not None
        check_call(choice.message.tool_calls[0], {"get_weather"})
    ids = [c.message.tool_calls[0].id for c in got.choices if c.message.tool_calls]
    assert len(set(ids)) == 3


@pytest.mark.parametrize("model", MODELS)
async def test_auto_renders_tools_and_lets_the_model_answer(
    api: openai.AsyncOpenAI, model: str
) -> None:
    plain = await api.chat.completions.create(model=model, messages=ASK, max_tokens=4)
    auto = await api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=4)
    assert plain.usage is not None
    assert auto.usage is not None
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools, in the prompt
    # random words are no call: content, as ever
    assert auto.choices[0].finish_reason == "length"
    assert auto.choices[0].message.tool_calls is None
    assert auto.choices[0].message.content
    none = await api.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert none.usage is not None
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # told of no tools


@pytest.mark.parametrize("model", MODELS)
async def test_calls_and_results_in_the_history(api: openai.AsyncOpenAI, model: str) -> None:
    short = await api.chat.completions.create(
        model=model, messages=HISTORY[:2], tools=TOOLS, max_tokens=2
    )
    full = await api.chat.completions.create(
        model=model, messages=HISTORY, tools=TOOLS, max_tokens=2
    )
    assert short.usage is not None
    assert full.usage is not None
    assert full.usage.prompt_tokens > short.usage.prompt_tokens + 20  # the calls and results


async def test_refusals_are_named(api: openai.AsyncOpenAI) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"tools": [{"type": "function"}]}, "tools[0]", "invalid_value"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
            "invalid_value",
        ),
        ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "invalid_value",
        ),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ]
    for extra, param, code in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            await api.chat.completions.create(
                model="sim-model", messages=ASK, max_tokens=2, **extra
            )
        assert (refused.value.param, refused.value.code) == (param, code), extra
