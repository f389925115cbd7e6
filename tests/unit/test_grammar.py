"""Structured output: the request's constraint checked (table), the mask on a tiny tokenizer, the
compile cache, each engine's mask adapter, and the sim generating under a grammar."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest

from services.worker.engines import grammar, guides
from services.worker.engines.base import SamplingParams
from services.worker.engines.grammar import Problem
from services.worker.engines.guides import Constraint
from services.worker.engines.sim import END, GRAMMAR_TOKENS, VOCAB, SimEngine, SimSettings

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


def schema_format(schema: object, strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": strict}}


def valid(text: str) -> bool:
    """OBJ's rules, checked by hand (jsonschema is not a dependency)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(value, dict)
        and set(value) == {"name", "ok", "n"}
        and isinstance(value["name"], str)
        and len(value["name"]) <= 6
        and isinstance(value["ok"], bool)
        and type(value["n"]) is int
        and 0 <= value["n"] <= 99
    )


# ---- reading a request ----

SO = "structured_outputs"

ACCEPTED: list[tuple[dict[str, Any], Constraint | None]] = [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, grammar.json_object()),
    ({"response_format": schema_format(OBJ)}, grammar.json_schema(OBJ, strict=True)),
    ({"response_format": schema_format(OBJ, strict=False)}, grammar.json_schema(OBJ, False)),
    # not strict: what llguidance cannot enforce is ignored (OpenAI enforces nothing then)
    (
        {"response_format": schema_format({"type": "array", "uniqueItems": True}, strict=False)},
        grammar.json_schema({"type": "array", "uniqueItems": True}, strict=False),
    ),
    ({"guided_json": OBJ}, grammar.json_schema(OBJ, strict=False, param="guided_json")),
    ({"guided_json": json.dumps(OBJ)}, grammar.json_schema(OBJ, False, param="guided_json")),
    ({"guided_regex": "[a-c]+"}, grammar.regex("[a-c]+", param="guided_regex")),
    ({"guided_choice": ["yes", "no"]}, grammar.choice(["yes", "no"], param="guided_choice")),
    ({"guided_grammar": 'start: "hi"'}, grammar.lark('start: "hi"', param="guided_grammar")),
    # vLLM >= 0.10's structured_outputs: guided_*'s successor, one kind of them (options that
    # change nothing here accepted)
    ({"structured_outputs": {"json": OBJ}}, grammar.json_schema(OBJ, False, param=SO)),
    ({"structured_outputs": {"json": json.dumps(OBJ)}}, grammar.json_schema(OBJ, False, param=SO)),
    ({"structured_outputs": {"regex": "[a-c]+", "choice": None}}, grammar.regex("[a-c]+", SO)),
    ({"structured_outputs": {"choice": ["y", "n"]}}, grammar.choice(["y", "n"], param=SO)),
    ({"structured_outputs": {"grammar": 'start: "hi"'}}, grammar.lark('start: "hi"', SO)),
    (
        {"structured_outputs": {"json_object": True, "disable_any_whitespace": True}},
        grammar.json_object(SO),
    ),
    (
        {"structured_outputs": {"choice": ["y"], "json_object": False, "disable_fallback": True}},
        grammar.choice(["y"], param=SO),
    ),
]


@pytest.mark.parametrize(("fields", "expected"), ACCEPTED)
def test_accepted_constraints(fields: dict[str, Any], expected: Constraint | None) -> None:
    assert grammar.requested(fields) == expected


REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"response_format": {"type": "xml"}}, "response_format", "must be text, json_object"),
    ({"response_format": "json"}, "response_format", "must be text, json_object"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs a name"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
        "response_format",
        "must be a JSON object",
    ),
    (
        {"response_format": schema_format({"type": "array", "uniqueItems": True})},
        "response_format",
        "Unimplemented keys",
    ),
    ({"response_format": schema_format({"type": "strin"})}, "response_format", "Invalid type"),
    (
        {"response_format": schema_format({"$ref": "http://example.com/s.json"})},
        "response_format",
        "retrieving it failed",
    ),
    (
        {"response_format": schema_format({"enum": ["x" * 1000] * 100})},
        "response_format",
        "is over 65536 bytes",
    ),
    ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_choice": ["a"] * 2000}, "guided_choice", "wrong type or size"),
    ({"guided_json": "{not json"}, "guided_json", "guided_json: Expecting"),
    ({"guided_grammar": "start: nothing_defined"}, "guided_grammar", "nothing_defined"),
    (
        {"response_format": {"type": "json_object"}, "guided_regex": "a"},
        "guided_regex",
        "not several (response_format, guided_regex)",
    ),
    ({"structured_outputs": {}}, SO, "exactly one of json, regex"),
    ({"structured_outputs": "json"}, SO, "must be an object"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, SO, "exactly one of"),
    ({"structured_outputs": {"structural_tag": "{}"}}, SO, "structural_tag is not supported"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, SO, "whitespace_pattern"),
    ({"structured_outputs": {"regex": "a(b"}}, SO, "unclosed group"),
    ({"structured_outputs": {"json": "{not json"}}, SO, "structured_outputs: Expecting"),
    ({"structured_outputs": {"choice": "yes"}}, SO, "wrong type or size"),
    (
        {"guided_regex": "a", "structured_outputs": {"regex": "a"}},
        SO,
        "not several (guided_regex, structured_outputs)",
    ),
]


@pytest.mark.parametrize(("fields", "param", "message"), REFUSED)
def test_refused_constraints_name_the_problem(
    fields: dict[str, Any], param: str, message: str
) -> None:
    got = grammar.requested(fields)
    assert isinstance(got, Problem), got
    assert got.param == param
    assert message in got.message


def test_wrapped_json_is_a_tool_call_shape() -> None:
    c = grammar.wrapped_json("<tool_call>\n", OBJ, "\n</tool_call>")
    assert grammar.problem(c) is None
    g = byte_grammars().guide(c)
    for b in b'<tool_call>\n{"name":"a","ok":true,"n":7}\n</tool_call>':
        assert g.advance(len(VOCAB) + b), g.error
    assert g.done


# ---- the mask on a tiny tokenizer ----


def byte_grammars(capacity: int = 8) -> guides.Grammars:
    return guides.Grammars(guides.byte_tokenizer(GRAMMAR_TOKENS, END), capacity)


def allowed_text(g: guides.Guide) -> set[bytes]:
    mask = g.allowed()
    return {GRAMMAR_TOKENS[t] for t in range(len(mask)) if mask[t]}


def feed(g: guides.Guide, text: bytes) -> None:
    for b in text:
        assert g.advance(len(VOCAB) + b), g.error


PRINTABLE = {bytes([c]) for c in range(0x20, 0x7F)}
WORDS = {b" " + w.encode() for w in VOCAB}
MASKS: list[tuple[Constraint, bytes, set[bytes], bool]] = [
    # (constraint, text so far, tokens allowed next, complete)
    (grammar.choice(["yes", "no"]), b"", {b"y", b"n"}, False),
    (grammar.choice(["yes", "no"]), b"ye", {b"s"}, False),
    (grammar.choice(["yes", "no"]), b"yes", {b"<|end|>"}, True),
    (grammar.regex("a+"), b"aa", {b"a", b"<|end|>"}, False),  # may end or go on
    (grammar.json_object(), b"", {b"{"}, False),
    (grammar.json_object(), b"{}", {b"<|end|>"}, True),
    (grammar.json_schema(OBJ), b'{"name":"ab","ok":', {b"t", b"f"}, False),
    (grammar.json_schema(OBJ), b'{"name":"abcdef', {b'"'}, False),  # maxLength 6
]


@pytest.mark.parametrize(("c", "prefix", "expected", "done"), MASKS)
def test_mask(c: Constraint, prefix: bytes, expected: set[bytes], done: bool) -> None:
    g = byte_grammars().guide(c)
    feed(g, prefix)
    assert allowed_text(g) == expected
    assert g.done is done


def test_mask_inside_a_string() -> None:
    g = byte_grammars().guide(grammar.json_schema(OBJ))
    feed(g, b'{"name":"ab')
    got = allowed_text(g)
    assert got >= PRINTABLE
    assert b"\n" not in got  # a raw newline is not JSON
    # maxLength 6 leaves room for 4 characters: " the" fits, " fleet" does not
    assert got & WORDS == {w for w in WORDS if len(w) <= 4}


def test_a_refused_token_is_reported() -> None:
    g = byte_grammars().guide(grammar.choice(["yes"]))
    assert not g.advance(len(VOCAB) + ord("n"))
    assert g.error


def test_mask_list_forbids_what_the_grammar_does_and_what_lies_past_it() -> None:
    got = guides.mask_list([1.0, 2.0, 3.0, 4.0], bytes([200, 0, 200]))
    assert got == [1.0, -math.inf, 3.0, -math.inf]


def test_compiled_matchers_are_a_bounded_lru_and_each_guide_is_its_own() -> None:
    grammars = byte_grammars(capacity=2)
    a, b, c = grammar.regex("a+"), grammar.regex("b+"), grammar.regex("c+")
    first, second = grammars.guide(a), grammars.guide(a)
    feed(first, b"aa")
    assert allowed_text(second) == {b"a"}  # the second choice starts afresh
    grammars.guide(b)
    grammars.guide(a)  # a is now the most recent
    grammars.guide(c)  # b goes
    assert len(grammars) == 2
    assert list(grammars._compiled) == [a, c]


def test_byte_tokenizer_needs_every_byte() -> None:
    with pytest.raises(ValueError, match="every byte"):
        guides.byte_tokenizer([b"a", b"<end>"], 1)


# ---- each engine's adapter ----


def test_hf_constrain_masks_and_pads() -> None:
    torch = pytest.importorskip("torch")
    from services.worker.engines.hf_logits import constrain

    logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    got = constrain(logits, bytes([0, 200, 0, 200]))  # the head is wider than the tokenizer
    assert got.tolist() == [-math.inf, 2.0, -math.inf, 4.0, -math.inf]
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # a new tensor


def test_exl2_guide_filter_masks_feeds_and_reports() -> None:
    torch = pytest.importorskip("torch")
    from services.worker.engines.exl2_jobs import GuideFilter, filter_error

    guide = byte_grammars().guide(grammar.choice(["yes", "no"]))
    f = GuideFilter(guide, width=len(GRAMMAR_TOKENS) + 3)  # padded head
    assert f.can_mask_logits()
    assert f.use_background_worker()
    assert f.prepare_logit_mask()
    logits = torch.zeros(len(GRAMMAR_TOKENS) + 3)
    masked = f.mask_logits(logits)
    kept = {GRAMMAR_TOKENS[t] for t in torch.nonzero(masked == 0).flatten().tolist()}
    assert kept == {b"y", b"n"}
    allowed, ends = f.next()
    assert {GRAMMAR_TOKENS[t] for t in allowed} == {b"y", b"n"}
    assert ends == set()
    f.feed(torch.tensor([[len(VOCAB) + ord("y")]]))
    assert f.error == ""

    class Job:
        filters = (f,)

    assert filter_error(Job()) == ""
    f.feed(torch.tensor([[len(VOCAB) + ord("x")]]))
    assert "refused" in filter_error(Job())


# ---- the sim under a grammar ----


async def run(engine: SimEngine, params: SamplingParams) -> tuple[str, str | None, list[Any]]:
    text, reason, steps = "", None, list[Any]()
    async for chunk in engine.start("hello the fleet", params):
        text += chunk.text
        reason = chunk.finish_reason
        steps.extend(chunk.logprobs)
    return text, reason, steps


def sim() -> SimEngine:
    return SimEngine("m", SimSettings(ttft_s=0.0, tokens_per_s=1e6))


@pytest.mark.parametrize("seed", range(6))
async def test_sim_output_matches_the_schema(seed: int) -> None:
    params = SamplingParams(max_tokens=200, seed=seed, constraint=grammar.json_schema(OBJ))
    text, reason, _ = await run(sim(), params)
    assert reason == "stop"
    assert valid(text), text


async def test_sim_choices_each_follow_their_own_grammar() -> None:
    engine = sim()
    params = [
        SamplingParams(max_tokens=200, seed=s, constraint=grammar.json_schema(OBJ))
        for s in range(4)
    ]
    outs = await asyncio.gather(*(run(engine, p) for p in params))
    assert all(valid(text) and reason == "stop" for text, reason, _ in outs), outs
    assert len({text for text, _, _ in outs}) > 1


async def test_sim_max_tokens_cuts_the_json_with_length() -> None:
    params = SamplingParams(max_tokens=5, seed=0, constraint=grammar.json_schema(OBJ))
    text, reason, _ = await run(sim(), params)
    assert reason == "length"
    assert text == '{"nam'


async def test_sim_logit_bias_still_acts_within_the_grammar() -> None:
    c = grammar.regex("( the| fleet| routes){4}")
    plain, _, _ = await run(sim(), SamplingParams(max_tokens=10, seed=1, constraint=c))
    fleet = VOCAB.index("fleet")
    biased, reason, _ = await run(
        sim(),
        SamplingParams(max_tokens=10, seed=1, constraint=c, logit_bias=((fleet, 100.0),)),
    )
    assert biased == " fleet fleet fleet fleet" != plain
    assert reason == "stop"


async def test_sim_logprobs_are_of_the_masked_distribution() -> None:
    c = grammar.choice(["yes", "no"])
    _, _, steps = await run(sim(), SamplingParams(max_tokens=5, seed=0, constraint=c, logprobs=3))
    first = steps[0]
    assert first.chosen.token in ("y", "n")
    # two tokens share all the probability; the third alternative is one the grammar forbids
    assert math.isclose(sum(math.exp(t.logprob) for t in first.top[:2]), 1.0)
    assert first.top[2].logprob == -math.inf
    assert all(math.isclose(s.chosen.logprob, 0.0, abs_tol=1e-9) for s in steps[1:])
