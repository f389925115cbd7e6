"""Penalties and logit_bias through the worker's HTTP API (sim and transformers engines) and
through the router with the official openai client: what a client can observe of them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from services.worker.engines.sim import VOCAB
from tests.helpers import assert_error_envelope, post
from tests.integration.fleet_fixtures import fleet, running_worker

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"


def ask(model: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "say hi"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


async def answer(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> str:
    status, data, _ = await post(s, url + CHAT, body)
    assert status == 200, data
    return str(data["choices"][0]["message"]["content"])


@pytest.fixture
async def sim(nats_url: str, prefix: str) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    async with (
        running_worker(nats_url, prefix, register=False, sim_tokens_per_s=5000.0) as w,
        aiohttp.ClientSession() as s,
    ):
        yield w.url, s


async def test_sim_logit_bias_bans_and_forces_words(sim: tuple[str, aiohttp.ClientSession]) -> None:
    url, s = sim
    plain = (await answer(s, url, ask("sim-model", 30))).split()
    first = VOCAB.index(plain[0])
    banned = (await answer(s, url, ask("sim-model", 30, logit_bias={str(first): -100}))).split()
    assert banned[0] != plain[0]
    assert plain[0] not in banned
    forced = VOCAB.index("fleet")
    assert "fleet" not in plain[:1]
    forcing = ask("sim-model", 6, logit_bias={str(forced): 100})
    assert await answer(s, url, forcing) == " ".join(["fleet"] * 6)
    # streamed the same way
    status, raw, _ = await post(s, url + TEXT, forcing | {"prompt": "x", "stream": True})
    assert status == 200
    assert raw.count(b'"text":"fleet"') + raw.count(b'"text":" fleet"') == 6


async def test_sim_penalties_change_repetitive_output(
    sim: tuple[str, aiohttp.ClientSession],
) -> None:
    url, s = sim
    n = len(VOCAB) + 6  # more words than the vocabulary: the plain answer must repeat some
    plain = (await answer(s, url, ask("sim-model", n))).split()
    assert len(set(plain)) < n
    for knob in ("presence_penalty", "frequency_penalty"):
        varied = (await answer(s, url, ask("sim-model", n, **{knob: 2}))).split()
        # a used word's logit (< 1 - 2) loses to every unused one's (>= 0)
        assert len(set(varied[: len(VOCAB)])) == len(VOCAB), (knob, varied)
        assert varied[0] == plain[0]  # nothing generated yet, nothing penalized
    stuck = (await answer(s, url, ask("sim-model", 10, presence_penalty=-2))).split()
    assert stuck == [plain[0]] * 10
    # repetition counts the prompt: every word but "fleet" in it, so "fleet" comes first
    prompt = " ".join(w for w in VOCAB if w != "fleet")
    body = ask("sim-model", 3) | {"messages": [{"role": "user", "content": prompt}]}
    assert (await answer(s, url, body)).split()[0] != "fleet"
    body["repetition_penalty"] = 100.0
    assert (await answer(s, url, body)).split()[0] == "fleet"


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
        ({"frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
        ({"repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
        ({"logit_bias": {"1": 101}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {str(len(VOCAB)): 1}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"fleet": 1}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"-1": 1}}, "logit_bias", "invalid_value"),
    ],
)
async def test_sim_invalid_values_are_400_naming_the_param(
    sim: tuple[str, aiohttp.ClientSession], extra: dict[str, Any], param: str, code: str
) -> None:
    url, s = sim
    for path, body in ((CHAT, ask("sim-model", 3)), (TEXT, {"model": "sim-model", "prompt": "x"})):
        status, data, _ = await post(s, url + path, body | extra)
        assert status == 400, data
        assert_error_envelope(data, code, "invalid_request_error")
        assert data["error"]["param"] == param


async def test_transformers_logit_bias_and_penalties(hf_worker: Any, demo_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_dir), local_files_only=True)

    def ids(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False))

    w = hf_worker
    async with aiohttp.ClientSession() as s:
        first = ids(await answer(s, w.url, ask("demo", 1)))
        assert len(first) == 1, first  # one whole token: its text encodes back to its id
        plain = await answer(s, w.url, ask("demo", 16))
        banned = await answer(s, w.url, ask("demo", 16, logit_bias={str(first[0]): -100}))
        assert ids(banned)[:1] != first
        assert banned != plain
        forced = ids("Switchboard")[0]
        assert forced != first[0]
        forcing = ask("demo", 4, logit_bias={str(forced): 100})
        assert await answer(s, w.url, forcing) == tok.decode([forced] * 4)
        # the random demo model's greedy answer repeats one token; penalties break the loop
        assert ids(plain)[:4] == first * 4
        for knob in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            varied = await answer(s, w.url, ask("demo", 16, **{knob: 2}))
            assert ids(varied)[:1] == first  # nothing generated yet: the same first token
            assert ids(varied)[1:2] != first, knob  # then another than the repeated one
        vocab = w.service.models["demo"].engine.vocab_size
        status, data, _ = await post(s, w.url + CHAT, ask("demo", 2, logit_bias={str(vocab): 1}))
        assert (status, data["error"]["param"]) == (400, "logit_bias"), data


async def test_official_client_through_the_router(nats_url: str, prefix: str) -> None:
    async with fleet(nats_url, prefix, [{"sim_tokens_per_s": 5000.0}]) as (router, _):
        client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        messages: list[Any] = [{"role": "user", "content": "say hi"}]
        forced = await client.chat.completions.create(
            model="sim-model",
            messages=messages,
            max_tokens=5,
            temperature=0,
            logit_bias={str(VOCAB.index("worker")): 100},
        )
        assert forced.choices[0].message.content == " ".join(["worker"] * 5)
        varied = await client.completions.create(
            model="sim-model",
            prompt="once upon",
            max_tokens=len(VOCAB),
            presence_penalty=2,
            frequency_penalty=0.5,
        )
        assert sorted(varied.choices[0].text.split()) == sorted(VOCAB)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="sim-model", messages=messages, logit_bias={"99999": -100}
            )
        assert refused.value.param == "logit_bias"
        await client.close()
