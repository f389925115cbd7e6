"""Issue #18's OpenAI fields on exllamav2, with the official openai client through a real router
(the GPU half of tests/integration/test_openai_fields.py, test_structured_output.py and
test_tool_calls.py): structured output through exllamav2's filter hook (exl2_jobs.GuideFilter),
forced tool calls, penalties, logprobs, n and best_of, and the table's refusals. Skipped (by
tests/conftest.py) without CUDA or exllamav2."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.fleet_fixtures import fleet
from tests.integration.test_openai_fields import (
    NEUTRAL_CHAT,
    REFUSED_CHAT,
    REFUSED_TEXT,
    REFUSED_VLLM,
    refusal,
)
from tests.integration.test_structured_output import SCHEMA, Obj, streamed_text, valid
from tests.integration.test_tool_calls import ASK, TOOLS, forced_calls, streamed_calls

pytestmark = pytest.mark.gpu
MODEL = "demo"
HI: list[Any] = [{"role": "user", "content": "describe a worker"}]


@pytest.fixture
async def api(nats_url: str, prefix: str, demo_dir: Path) -> AsyncIterator[openai.AsyncOpenAI]:
    # four slots whether exllamav2 runs paged or not (unpaged, its generator runs them in turn)
    exl2 = {
        "engine": "exllamav2",
        "model_dir": str(demo_dir),
        "models": (MODEL,),
        "max_in_flight": 4,
    }
    async with fleet(nats_url, prefix, [exl2]) as (router, _):
        client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        yield client
        await client.close()


async def test_structured_output(api: openai.AsyncOpenAI) -> None:
    """The random-weight demo model answers in the schema's shape only through the grammar."""
    for seed in range(2):
        got = await api.chat.completions.create(
            model=MODEL, messages=HI, response_format=SCHEMA, n=2, seed=seed, max_tokens=100
        )
        assert len(got.choices) == 2
        for choice in got.choices:
            assert choice.finish_reason == "stop"
            assert valid(choice.message.content or ""), choice.message.content
    greedy = await api.chat.completions.create(
        model=MODEL, messages=HI, response_format=SCHEMA, temperature=0, max_tokens=100
    )
    assert valid(greedy.choices[0].message.content or "")
    stream = await api.chat.completions.create(
        model=MODEL, messages=HI, response_format=SCHEMA, stream=True, max_tokens=100, seed=5
    )
    text, reasons = await streamed_text(stream)
    assert valid(text), text
    assert [r for r in reasons if r] == ["stop"]
    parsed = await api.chat.completions.parse(
        model=MODEL, messages=HI, response_format=Obj, max_tokens=100, seed=3
    )
    assert isinstance(parsed.choices[0].message.parsed, Obj)
    picked = await api.completions.create(
        model=MODEL, prompt="is it?", max_tokens=10, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert picked.choices[0].text in ("yes", "no")
    assert picked.choices[0].finish_reason == "stop"
    pattern = "[A-C]{3}-[0-9]"
    regex = await api.completions.create(
        model=MODEL, prompt="code:", max_tokens=10, extra_body={"guided_regex": pattern}
    )
    assert re.fullmatch(pattern, regex.choices[0].text), regex.choices[0].text


async def test_forced_tool_calls(api: openai.AsyncOpenAI) -> None:
    base: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 700}
    await forced_calls(api, base)
    got, finish = await streamed_calls(api, **base, tool_choice="required", seed=1)
    assert finish == "tool_calls"
    assert got
    for _, name, _ in got:
        assert name in {"get_weather", "get_time"}
    plain = await api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    auto = await api.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=2)
    assert plain.usage is not None
    assert auto.usage is not None
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the template's tools


async def test_penalties_logprobs_and_choices(api: openai.AsyncOpenAI, demo_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_dir), local_files_only=True)
    forced = tok.encode("Switchboard", add_special_tokens=False)[0]
    ask: dict[str, Any] = {"model": MODEL, "messages": HI, "max_tokens": 4, "temperature": 0}
    biased = await api.chat.completions.create(
        **ask, logit_bias={str(forced): 100}, logprobs=True, top_logprobs=2
    )
    assert biased.choices[0].message.content == tok.decode([forced] * 4)
    lp = biased.choices[0].logprobs
    assert lp is not None
    assert lp.content is not None
    assert len(lp.content) == 4
    assert all(t.logprob > -1e-3 and len(t.top_logprobs) == 2 for t in lp.content)
    for knob in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        served = await api.chat.completions.create(**ask, extra_body={knob: 2})
        assert served.choices[0].message.content is not None, knob
    many = await api.chat.completions.create(**ask | {"temperature": 0.8}, n=3, seed=4)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.usage is not None
    assert many.usage.completion_tokens <= 12
    text: dict[str, Any] = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 4}
    best = await api.completions.create(**text, best_of=3, n=2, seed=9, logprobs=1)
    assert [c.index for c in best.choices] == [0, 1]
    means = [
        sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)
        for c in best.choices
        if c.logprobs is not None and c.logprobs.token_logprobs
    ]
    assert means == sorted(means, reverse=True)  # best first


async def test_the_tables_refusals_and_neutral_fields(api: openai.AsyncOpenAI) -> None:
    for field, value in REFUSED_CHAT:
        ask: dict[str, Any] = {"model": MODEL, "messages": HI, "max_tokens": 1}
        err = await refusal(api.chat.completions.create(**ask, extra_body={field: value}))
        assert (err.code, err.param) == ("unsupported_parameter", field), field
    for field, value in REFUSED_TEXT:
        text: dict[str, Any] = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        err = await refusal(api.completions.create(**text, extra_body={field: value}))
        assert (err.code, err.param) == ("unsupported_parameter", field), field
    ask = {"model": MODEL, "messages": HI, "max_tokens": 5, "temperature": 0}
    plain = await api.chat.completions.create(**ask)
    same = await api.chat.completions.create(**ask, extra_body=NEUTRAL_CHAT)
    assert same.choices[0].message.content == plain.choices[0].message.content


async def test_vllm_extensions(api: openai.AsyncOpenAI, demo_dir: Path) -> None:
    """min_p (exllamav2's own), stop_token_ids and ignore_eos (its stop_conditions), min_tokens
    (its min_new_tokens), structured_outputs and completions' response_format (the filter
    hook), and the ones no engine has, refused by name: as on sim and transformers
    (tests/integration/test_openai_fields.py)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_dir), local_files_only=True)
    eos = str(tok.eos_token_id)
    ask: dict[str, Any] = {"model": MODEL, "messages": HI, "max_tokens": 4, "temperature": 0}
    no_end: dict[str, Any] = {"logit_bias": {eos: -100}}
    greedy = await api.chat.completions.create(**ask, **no_end)
    first = tok.encode(greedy.choices[0].message.content or "", add_special_tokens=False)[0]
    stop: dict[str, Any] = {"stop_token_ids": [first]}
    got = await api.chat.completions.create(**ask, **no_end, extra_body=stop)
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == ("", "stop")
    held = await api.chat.completions.create(**ask, **no_end, extra_body=stop | {"min_tokens": 2})
    held_ids = tok.encode(held.choices[0].message.content or "", add_special_tokens=False)
    assert held_ids[:1] != [first]
    # the end token forced: it ends at once; min_tokens holds it back; ignore_eos ignores it
    forced: dict[str, Any] = {"logit_bias": {eos: 100}}
    usage: dict[str, tuple[int, str | None]] = {}
    extra: dict[str, Any]
    for name, extra in (
        ("plain", {}),
        ("min", {"min_tokens": 2}),
        ("ignore", {"ignore_eos": True}),
    ):
        ended = await api.chat.completions.create(**ask, **forced, extra_body=extra)
        assert ended.usage is not None
        usage[name] = (ended.usage.completion_tokens, ended.choices[0].finish_reason)
    assert usage == {"plain": (1, "stop"), "min": (3, "stop"), "ignore": (4, "length")}
    # min_p 1 keeps only the likeliest token: greedy, each logprob 0
    sharp = await api.chat.completions.create(
        **ask | {"temperature": 1.0}, **no_end, seed=3, logprobs=True, extra_body={"min_p": 1.0}
    )
    assert sharp.choices[0].message.content == greedy.choices[0].message.content
    lp = sharp.choices[0].logprobs
    assert lp is not None
    assert [round(t.logprob, 3) for t in lp.content or []] == [0.0] * 4
    so: dict[str, Any] = {"structured_outputs": {"choice": ["yes", "no"]}}
    chosen = await api.chat.completions.create(**ask | {"max_tokens": 5}, extra_body=so)
    assert chosen.choices[0].message.content in ("yes", "no")
    text = await api.completions.create(
        model=MODEL,
        prompt="json please",
        max_tokens=60,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert text.choices[0].text.startswith("{")
    for field, value in REFUSED_VLLM:
        err = await refusal(api.chat.completions.create(**ask, extra_body={field: value}))
        assert (err.code, err.param) == ("unsupported_parameter", field), field
