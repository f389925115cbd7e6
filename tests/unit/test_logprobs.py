"""Log probabilities: the distribution (against a naive reference), the sim's, the transformers
engine's torch twin, and the OpenAI shapes they become (checked with the openai client's own
types)."""

from __future__ import annotations

import math
from typing import Any

import openai.types
import openai.types.chat
import pytest
import torch

from schemas import codec
from services.worker.engines import hf_logits, logprobs
from services.worker.engines.base import Chunk, SamplingParams
from services.worker.engines.logprobs import FLOOR, StepLogprobs, TokenLogprob
from services.worker.engines.sim import VOCAB, SimEngine, SimSettings
from services.worker.openai import Answer, Shape, best, chat_logprobs, text_logprobs

LOGITS = [0.3, 2.0, -1.0, 0.7, 2.0, 0.0, 1.5, -3.0]


def reference(
    logits: list[float], temperature: float, top_k: int = 0, top_p: float = 1.0
) -> list[float]:
    """The rule written the long way: probabilities, cut, renormalized, then logs."""
    if temperature == 0:
        temperature, top_k, top_p = 1.0, 0, 1.0
    weights = [math.exp(x / temperature) for x in logits]
    if top_k:
        kth = sorted(logits, reverse=True)[top_k - 1]
        weights = [w if x >= kth else 0.0 for w, x in zip(weights, logits, strict=True)]
    probs = [w / sum(weights) for w in weights]
    if top_p < 1.0:
        kept, before = set(), 0.0
        for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
            if before < top_p:
                kept.add(i)
            before += probs[i]
        probs = [p if i in kept else 0.0 for i, p in enumerate(probs)]
        probs = [p / sum(probs) for p in probs]
    return [math.log(p) if p > 0 else -math.inf for p in probs]


KNOBS = [
    (0.0, 0, 1.0),  # greedy: temperature 1, untruncated, whatever top_k / top_p say
    (0.0, 2, 0.5),
    (1.0, 0, 1.0),
    (0.5, 0, 1.0),
    (1.7, 0, 1.0),
    (1.0, 3, 1.0),  # two 2.0s tie: the 3rd largest is 1.5, so three are kept
    (1.0, 2, 1.0),  # ties at the k-th are all kept
    (1.0, 0, 0.5),
    (0.8, 4, 0.9),
    (1.0, 0, 0.01),  # only the likeliest
]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), KNOBS)
def test_distribution_is_the_reference_and_a_distribution(
    temperature: float, top_k: int, top_p: float
) -> None:
    got = logprobs.distribution(LOGITS, temperature, top_k, top_p)
    want = reference(LOGITS, temperature, top_k, top_p)
    assert [g == -math.inf for g in got] == [w == -math.inf for w in want]
    assert all(
        math.isclose(g, w, abs_tol=1e-12) for g, w in zip(got, want, strict=True) if w > -math.inf
    )
    assert all(g <= 0 for g in got)
    assert math.isclose(math.fsum(math.exp(g) for g in got), 1.0, abs_tol=1e-12)
    # the likeliest token is never cut: greedy and every sampler can draw it
    assert got[LOGITS.index(max(LOGITS))] == max(got) > -math.inf


def test_temperature_scales_log_odds() -> None:
    for t in (0.25, 1.0, 2.0):
        d = logprobs.distribution(LOGITS, t)
        assert math.isclose(d[1] - d[2], (2.0 - -1.0) / t)


def test_ranked_and_step() -> None:
    d = logprobs.distribution(LOGITS, 1.0, top_k=2)
    assert logprobs.ranked(d, 4) == [1, 4, 0, 2]  # equals: the lower id first, -inf included
    s = logprobs.step(d, 4, 3, lambda t: (f"t{t}", bytes([t])))
    assert s.chosen == TokenLogprob(token="t4", utf8=b"\x04", logprob=d[4])
    assert [t.token for t in s.top] == ["t1", "t4", "t0"]
    assert s.top[2].logprob == -math.inf
    assert logprobs.step(d, 4, 0, lambda t: ("", b"")).top == ()
    assert (logprobs.reported(-math.inf), logprobs.reported(-0.5)) == (FLOOR, -0.5)


def test_byte_level_names_decode_to_their_bytes() -> None:
    from tokenizers import pre_tokenizers

    text = "".join(chr(c) for c in range(1, 0x800)) + " 日本語 🎉"
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    names = [piece for piece, _ in split.pre_tokenize_str(text)]
    assert b"".join(logprobs.byte_level(n) or b"?" for n in names) == text.encode()
    assert logprobs.byte_level("Ġhi") == b" hi"
    assert logprobs.byte_level("▁hi") is None  # sentencepiece's space: not this alphabet
    assert logprobs.byte_level("") is None


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), KNOBS)
def test_transformers_distribution_is_the_rule(
    temperature: float, top_k: int, top_p: float
) -> None:
    """engines/hf_logits.py's torch twin of the rule, and its sampler draws only what it reports."""
    params = SamplingParams(max_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    logits = torch.tensor(LOGITS)
    got = hf_logits.distribution(logits, params).tolist()
    want = logprobs.distribution(LOGITS, temperature, top_k, top_p)
    assert [g == -math.inf for g in got] == [w == -math.inf for w in want]
    assert all(
        math.isclose(g, w, abs_tol=1e-5) for g, w in zip(got, want, strict=True) if w > -math.inf
    )
    rng = torch.Generator().manual_seed(1)
    drawn = {hf_logits.sample(logits, params, rng) for _ in range(200)}
    assert all(got[t] > -math.inf for t in drawn)
    top = hf_logits.torch_topk(torch.tensor(got), 3)
    assert [lp for _, lp in top] == sorted(got, reverse=True)[:3]  # equals in any order
    assert all(got[t] == lp for t, lp in top)


# ---- the sim ----

FAST = SimSettings(ttft_s=0.0, tokens_per_s=1e6)


async def sim_chunks(params: SamplingParams, prompt: str = "tell me") -> list[Chunk]:
    engine = SimEngine("m", FAST)
    return [c async for c in engine.start(prompt, params)]


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"temperature": 0},
        {"temperature": 0.3, "top_k": 2},
        {"top_p": 0.2, "seed": 5},
        {"presence_penalty": 2.0, "logit_bias": ((3, 0.5),)},
    ],
)
async def test_sim_logprobs_are_its_distribution(knobs: dict[str, Any]) -> None:
    k = 5
    chunks = await sim_chunks(SamplingParams(max_tokens=12, logprobs=k, **knobs))
    steps = [s for c in chunks for s in c.logprobs]
    assert len(steps) == sum(c.tokens for c in chunks) == 12
    assert "".join(s.chosen.token for s in steps) == "".join(c.text for c in chunks)
    for s in steps:
        values = [t.logprob for t in s.top]
        assert len(s.top) == k
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in [*values, s.chosen.logprob])
        # the sim picks its distribution's likeliest token: it heads the list, same entry
        assert s.top[0] == s.chosen
        assert s.chosen.logprob > -math.inf
        assert all(t.utf8 == t.token.encode() for t in (*s.top, s.chosen))
    if knobs.get("top_k") == 2:  # the rest cannot be drawn (only ties with the 2nd can)
        cut = [sum(t.logprob == -math.inf for t in s.top) for s in steps]
        assert all(n <= 3 for n in cut)
        assert 3 in cut
    plain = await sim_chunks(SamplingParams(max_tokens=12, **knobs))
    assert [c.text for c in plain] == [c.text for c in chunks]  # asking changes no answer
    assert all(c.logprobs == () for c in plain)


async def test_sim_logprobs_sum_to_one_over_its_vocabulary() -> None:
    chunks = await sim_chunks(SamplingParams(max_tokens=3, logprobs=20, temperature=0.7))
    for s in (s for c in chunks for s in c.logprobs):
        listed = {t.token.strip() for t in s.top}
        assert len(listed) == 20
        assert math.fsum(math.exp(t.logprob) for t in s.top) < 1.0  # 20 of len(VOCAB) words
    assert len(VOCAB) > 20


async def test_sim_stop_string_keeps_the_tokens_that_spelled_it() -> None:
    full = await sim_chunks(SamplingParams(max_tokens=20, seed=3, logprobs=0))
    words = "".join(c.text for c in full).split()
    stopped = await sim_chunks(SamplingParams(max_tokens=20, seed=3, logprobs=0, stop=(words[4],)))
    assert stopped[-1].finish_reason == "stop"
    assert len([s for c in stopped for s in c.logprobs]) == sum(c.tokens for c in stopped)


# ---- the OpenAI shapes ----


def step(token: str, logprob: float, *top: tuple[str, float]) -> StepLogprobs:
    def one(t: str, lp: float) -> TokenLogprob:
        return TokenLogprob(token=t, utf8=t.encode(), logprob=lp)

    return StepLogprobs(chosen=one(token, logprob), top=tuple(one(t, lp) for t, lp in top))


STEPS = [
    step("Hi", -0.25, ("Hi", -0.25), ("Yo", -1.5)),
    step(" th", -0.5, ("\ufffd", -0.4), (" th", -0.5)),
    step("ere", -math.inf, ("\ufffd", -0.1), ("\ufffd", -0.2)),  # cut by top-p; names collide
]


def test_chat_logprobs_shape() -> None:
    got = codec.decode(codec.encode(chat_logprobs(STEPS)), dict)
    assert got["refusal"] is None
    assert got["content"][0] == {
        "token": "Hi",
        "logprob": -0.25,
        "bytes": [72, 105],
        "top_logprobs": [
            {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
            {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]},
        ],
    }
    assert got["content"][2]["logprob"] == FLOOR
    assert got["content"][1]["top_logprobs"][0]["bytes"] == [0xEF, 0xBF, 0xBD]


def test_text_logprobs_shape() -> None:
    got = codec.decode(codec.encode(text_logprobs(STEPS, offset=7)), dict)
    assert got == {
        "tokens": ["Hi", " th", "ere"],
        "token_logprobs": [-0.25, -0.5, FLOOR],
        # the alternatives and the sampled token; a repeated name keeps the likelier logprob
        "top_logprobs": [
            {"Hi": -0.25, "Yo": -1.5},
            {"\ufffd": -0.4, " th": -0.5},
            {"\ufffd": -0.1, "ere": FLOOR},
        ],
        "text_offset": [7, 9, 12],
    }


def answers() -> list[Answer]:
    a, b = Answer(), Answer()
    a.add("Hi th", None, STEPS[:2])
    a.add("ere", "length", STEPS[2:])
    b.add("Yo", "stop", STEPS[:1])
    return [a, b]


def test_full_responses_parse_as_openais_types() -> None:
    from services.worker.openai import usage

    chat = Shape(chat=True, id="chatcmpl-1", created=1, model="m", logprobs=True)
    full = openai.types.chat.ChatCompletion.model_validate_json(
        codec.encode(chat.full(answers(), usage(5, 4)))
    )
    assert [c.index for c in full.choices] == [0, 1]
    assert full.choices[0].logprobs is not None
    assert full.choices[0].logprobs.content is not None
    assert [t.token for t in full.choices[0].logprobs.content] == ["Hi", " th", "ere"]
    assert full.usage is not None
    assert full.usage.completion_tokens == 4
    text = Shape(chat=False, id="cmpl-1", created=1, model="m", logprobs=True)
    done = openai.types.Completion.model_validate_json(
        codec.encode(text.full(answers(), usage(5, 4)))
    )
    assert done.choices[1].text == "Yo"
    assert done.choices[1].logprobs is not None
    assert done.choices[1].logprobs.text_offset == [0]
    plain = Shape(chat=True, id="c", created=1, model="m")
    assert (
        codec.decode(codec.encode(plain.full(answers(), usage(1, 1))), dict)["choices"][0][
            "logprobs"
        ]
        is None
    )


def test_stream_pieces_carry_their_choice_and_its_tokens() -> None:
    chat = Shape(chat=True, id="c", created=1, model="m", logprobs=True)
    opening = chat.first(3).split(b"\n\n")[:-1]
    assert [codec.decode(o[6:], dict)["choices"][0]["index"] for o in opening] == [0, 1, 2]
    piece = chat.piece(" th", None, index=2, steps=STEPS[1:2])
    chunk = openai.types.chat.ChatCompletionChunk.model_validate_json(piece[6:])
    assert chunk.choices[0].index == 2
    assert chunk.choices[0].logprobs is not None
    assert chunk.choices[0].logprobs.content is not None
    assert chunk.choices[0].logprobs.content[0].token == " th"
    bare = codec.decode(chat.piece("", "stop", index=1)[6:], dict)
    assert bare["choices"][0]["logprobs"] is None  # a chunk without tokens has none
    text = Shape(chat=False, id="c", created=1, model="m", logprobs=True)
    got = openai.types.Completion.model_validate_json(
        text.piece("ere", "length", index=1, steps=STEPS[2:], offset=5)[6:]
    )
    assert got.choices[0].logprobs is not None
    assert got.choices[0].logprobs.text_offset == [5]
    assert text.first(3) == b""


def test_best_answers_have_the_highest_mean_token_logprob() -> None:
    def answer(*values: float) -> Answer:
        a = Answer()
        a.add("x", "stop", [step("x", v) for v in values])
        return a

    short, long, empty, tie = answer(-1.0), answer(-0.1, -0.1, -2.5), answer(), answer(-1.0)
    # per token, not summed: the long answer's -0.9 beats the short one's -1.0
    assert best([short, long, empty, tie], 4) == [long, short, tie, empty]
    assert best([short, long], 1) == [long]
