"""Tool calls: requests' tools and tool_choice checked, recorded model outputs of each format
read into OpenAI's tool_calls (whole and streamed in any split), forced calls' grammars."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import msgspec
import pytest

from schemas.codec import encode
from schemas.inference import ChatCompletionRequest
from services.common.errors import ApiError
from services.worker import tools
from services.worker.engines import grammar, guides
from services.worker.engines.params import SamplingParams
from services.worker.openai import Answer, Shape
from services.worker.tool_formats import ToolFormat, call_id, detect, parse_body
from services.worker.tool_replies import pieces, settle
from services.worker.tool_stream import (
    ArgsPiece,
    CallHead,
    CallOut,
    ToolStream,
    parse,
    split,
    whole,
)

NAMES = frozenset({"get_weather", "get_time"})
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Nice"]}},
            "required": ["city"],
        },
    },
}
TIME: dict[str, Any] = {"type": "function", "function": {"name": "get_time"}}
PARIS = '{"city": "Paris"}'

# What models of each family wrote when asked about the weather (hand-copied from their
# documented output formats): (format, text, content, [(name, arguments)]).
RECORDED: list[tuple[ToolFormat, str, str | None, list[tuple[str, str]]]] = [
    (  # Qwen2.5-7B-Instruct
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        None,
        [("get_weather", PARIS)],
    ),
    (  # Hermes-2-Pro: a word first, then two calls
        "hermes",
        "Let me check both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n',
        "Let me check both.",
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    (  # Qwen3: arguments as a string, non-ASCII kept
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Zürich\\"}"}'
        "\n</tool_call>",
        None,
        [("get_weather", '{"city": "Zürich"}')],
    ),
    (  # Llama-3.1-8B-Instruct, custom tools: bare JSON with "parameters"
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", PARIS)],
    ),
    (  # Llama-3.2-3B-Instruct: python_tag, two calls separated by ";"
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "parameters": {}}',
        None,
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    (  # Mistral-7B-Instruct-v0.3
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        None,
        [("get_weather", PARIS)],
    ),
    (  # Mistral-Small (v11 tokenizer): name[ARGS]{...} per call
        "mistral",
        'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}',
        "Checking.",
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    (  # an engine that drops special tokens: [TOOL_CALLS] gone, the list left
        "mistral",
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        None,
        [("get_weather", PARIS)],
    ),
]
# Outputs that are not calls: each is all content, never an error.
NOT_CALLS: list[tuple[ToolFormat, str]] = [
    ("hermes", "The weather is fine; use <b>tags</b> & a < b."),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>'),
    ("hermes", "<tool_call>\n" + "[" * 100_000),
    ("llama3_json", '{"answer": 42}'),
    ("llama3_json", "Paris is sunny."),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}'),
    ("mistral", "[1, 2, 3]"),
    ("mistral", "Sure [TOOL_CALLS] nothing[ARGS]{}"),
]


def ids() -> Any:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def reader(fmt: ToolFormat, parallel: bool = True) -> ToolStream:
    return ToolStream(fmt, NAMES, ids(), parallel=parallel)


def streamed(fmt: ToolFormat, pieces_: list[str]) -> tuple[str, list[CallOut]]:
    stream = reader(fmt)
    events = [e for piece in pieces_ for e in stream.feed(piece)]
    content, calls = split([*events, *stream.end()])
    return content, whole(calls)


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), RECORDED)
def test_recorded_outputs_are_read_as_calls(
    fmt: ToolFormat, text: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    got_content, got = parse(reader(fmt), text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    assert [c.index for c in got] == list(range(len(calls)))
    assert len({c.id for c in got}) == len(got)
    # streamed in any split: a character at a time, and in two pieces at every place
    for split_at in [None, *range(1, len(text))]:
        parts = list(text) if split_at is None else [text[:split_at], text[split_at:]]
        s_content, s_calls = streamed(fmt, parts)
        assert s_content == (content or "")
        assert [(c.name, c.arguments) for c in s_calls] == calls


@pytest.mark.parametrize(("fmt", "text"), NOT_CALLS)
def test_what_is_not_a_call_stays_content(fmt: ToolFormat, text: str) -> None:
    content, calls = parse(reader(fmt), text)
    assert (content, calls) == (text, [])
    s_content, s_calls = streamed(fmt, [*text[:300], text[300:]])
    assert (s_content, s_calls) == (text, [])


def test_text_that_may_start_a_marker_is_held_back() -> None:
    stream = reader("hermes")
    assert split(stream.feed("Sure <tool")) == ("Sure", [])  # " <tool" held
    assert split(stream.feed("box> is here ")) == (" <toolbox> is here", [])
    assert split(stream.end()) == (" ", [])  # no calls: trailing whitespace kept


def test_parallel_false_answers_the_first_call_only() -> None:
    text = RECORDED[1][1]
    content, calls = parse(reader("hermes", parallel=False), text)
    assert content == "Let me check both."
    assert [(c.index, c.name) for c in calls] == [(0, "get_weather")]


def test_call_ids_fit_each_format() -> None:
    hex_ = "0123456789abcdef" * 2
    assert call_id("hermes", hex_) == "call_" + hex_[:24]
    assert call_id("mistral", hex_) == hex_[:9]  # Mistral templates refuse other ids


def test_formats_are_told_from_templates() -> None:
    assert detect("{{ '<tool_call>' }}") == "hermes"
    assert detect("{%- if message.role == 'ipython' %}<|python_tag|>") == "llama3_json"
    assert detect("[AVAILABLE_TOOLS]...[TOOL_CALLS]") == "mistral"
    assert detect("{{ messages }}") is None


# What a grammar-forced reply of each format can be (compact JSON, no content): calls with
# nested values, strings holding braces, brackets, quotes and escapes, and one whose
# arguments come before its name (then it goes out whole).
FORCED: list[tuple[ToolFormat, str]] = [
    (
        "hermes",
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"Pa}r\\"is","n":[1,{"x":"]"}]}}'
        '\n</tool_call>\n<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>',
    ),
    (
        "llama3_json",
        '{"name":"get_weather","parameters":{"city":"Zürich \\\\","d":{"e":null}}}; '
        '{"parameters":{"tz":"UTC"},"name":"get_time"}',
    ),
    (
        "mistral",
        '[{"name":"get_time","arguments":{"q":"{[\\u00e9"}}, '
        '{"name":"get_weather","arguments":{"city":"Nice","v":-1.5e3}}]',
    ),
]


def chunkings(text: str) -> Any:
    """text a character at a time, in two pieces at every place, and in random sizes."""
    yield list(text)
    for at in range(1, len(text)):
        yield [text[:at], text[at:]]
    rng = random.Random(7)
    for _ in range(50):
        parts, at = [], 0
        while at < len(text):
            n = rng.randint(1, 12)
            parts.append(text[at : at + n])
            at += n
        yield parts


def sse_calls(stream: ToolStream, parts: list[str]) -> tuple[str, dict[int, list[Any]]]:
    """The reply streamed as SSE chunks: its content, and each call's deltas by index."""
    shape = Shape(chat=True, id="chatcmpl-1", created=1, model="m")
    out = [c for p in parts[:-1] for c in pieces(shape, stream, p, None, index=0)]
    out += pieces(shape, stream, parts[-1], "stop", index=0)
    content, calls = "", dict[int, list[Any]]()
    for chunk in out:
        delta = json.loads(chunk.removeprefix(b"data: "))["choices"][0]["delta"]
        content += delta.get("content", "")
        for d in delta.get("tool_calls", []):
            calls.setdefault(d["index"], []).append(d)
    return content, calls


@pytest.mark.parametrize(
    ("fmt", "text", "live"),
    [
        *[(f, t, False) for f, t, _, _ in RECORDED],
        *[(f, t, live) for f, t in FORCED for live in (False, True)],
    ],
)
def test_streamed_arguments_join_to_the_whole_ones(fmt: ToolFormat, text: str, live: bool) -> None:
    """Split anywhere, a call's argument pieces join to exactly its arguments read whole (and as
    the format reads them): live, they go out as they are generated, one per character fed."""
    want_content, want = parse(ToolStream(fmt, NAMES, ids(), live=live), text)
    # as the format reads it (hermes: the first call; mistral: all after its marker)
    body = text[max(text.find("[TOOL_CALLS]"), 0) :]
    if fmt == "hermes":
        body = text.split("<tool_call>")[1].split("</tool_call>")[0]
    read = parse_body(fmt, body, NAMES)
    assert read is not None
    assert [c.arguments for c in read] == [c.arguments for c in want][: len(read)]
    for parts in chunkings(text):
        content, calls = sse_calls(ToolStream(fmt, NAMES, ids(), live=live), parts)
        assert content == (want_content or "")
        assert sorted(calls) == [c.index for c in want]
        for c in want:
            first, *rest = calls[c.index]
            assert (first["id"], first["type"], first["function"]) == (
                c.id,
                "function",
                {"name": c.name, "arguments": ""},
            )
            assert [set(d) for d in rest] == [{"index", "function"}] * len(rest)
            assert "".join(d["function"]["arguments"] for d in rest) == c.arguments
            if parts == list(text) and live and not c.arguments.startswith('{"tz"'):
                assert len(rest) == len(c.arguments)  # live: a piece per character fed


def test_a_live_call_goes_out_as_it_is_generated() -> None:
    stream = ToolStream("hermes", NAMES, ids(), live=True)
    assert stream.feed('<tool_call>\n{"name":"get_wea') == []
    assert stream.feed('ther","arguments":{"ci') == [
        CallHead(index=0, id="call_0", name="get_weather"),
        ArgsPiece(index=0, arguments='{"ci'),
    ]
    assert stream.feed('ty":"Paris"}}\n</tool_call>\n<tool') == [
        ArgsPiece(index=0, arguments='ty":"Paris"}')
    ]
    # cut off (finish_reason "length"): the arguments it had, as OpenAI's
    assert stream.feed('_call>\n{"name":"get_time","arguments":{"a') == [
        CallHead(index=1, id="call_1", name="get_time"),
        ArgsPiece(index=1, arguments='{"a'),
    ]
    assert stream.end() == []
    cut = ToolStream("hermes", NAMES, ids(), live=True)
    assert split([*cut.feed('<tool_call>\n{"name":"get_we'), *cut.end()]) == (
        '{"name":"get_we',
        [],
    )


def test_only_forced_calls_are_live() -> None:
    for choice, live in [("auto", False), ("required", True)]:
        plan = tools.plan(request(tools=[WEATHER], tool_choice=choice), HERMES, "m")
        assert isinstance(plan, tools.ToolPlan)
        events = plan.stream(ids()).feed('<tool_call>\n{"name":"get_weather","arguments":{"c')
        assert bool(events) == live  # "auto": nothing until the call is whole and checked


# ---- responses ----


def test_whole_and_streamed_replies_have_openai_shapes() -> None:
    shape = Shape(chat=True, id="chatcmpl-1", created=1, model="m")
    answer = Answer()
    answer.add(RECORDED[1][1], "stop", ())
    settle(answer, reader("hermes"))
    body = json.loads(encode(shape.full([answer], _usage())))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check both."
    assert choice["message"]["tool_calls"][0] == {
        "id": "call_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": PARIS},
    }
    plain = Answer()
    plain.add("no calls here", "stop", ())
    settle(plain, reader("hermes"))
    message = json.loads(encode(shape.full([plain], _usage())))["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "no calls here"}  # no tool_calls key
    stream = reader("hermes")
    out = pieces(shape, stream, RECORDED[0][1][:20], None, index=1)
    out += pieces(shape, stream, RECORDED[0][1][20:], "stop", index=1)
    chunks = [json.loads(c.removeprefix(b"data: ")) for c in out]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas == [
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": PARIS}}]},
        {},
    ]
    assert [c["choices"][0]["index"] for c in chunks] == [1, 1, 1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def _usage() -> Any:
    from services.worker.openai import usage

    return usage(1, 1)


def test_a_cut_off_reply_stays_length() -> None:
    assert tools.finish_reason("length", True) == "length"
    assert tools.finish_reason("stop", True) == "tool_calls"
    assert tools.finish_reason("stop", False) == "stop"


# ---- requests ----

HERMES = tools.ModelTools(renders=True, format="hermes")


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.convert(body, ChatCompletionRequest)


def refusal(got: object) -> tuple[int, str, str | None]:
    assert isinstance(got, ApiError), got
    return got.status, got.code, got.param


def test_tool_choice_is_read_as_openai_defines_it() -> None:
    auto = tools.plan(request(tools=[WEATHER, TIME]), HERMES, "m")
    assert isinstance(auto, tools.ToolPlan)
    assert (auto.choice, auto.names, auto.parallel) == ("auto", NAMES, True)
    assert tools.plan(request(tools=[WEATHER], tool_choice="none"), HERMES, "m") is None
    assert tools.plan(request(), HERMES, "m") is None
    assert tools.plan(request(tool_choice="auto"), HERMES, "m") is None
    named = tools.plan(
        request(
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            parallel_tool_calls=False,
        ),
        HERMES,
        "m",
    )
    assert isinstance(named, tools.ToolPlan)
    assert (named.choice, named.named, named.parallel) == ("named", "get_time", False)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{}]}, "tools[0]"),
        ({"tools": [WEATHER, {"type": "function", "function": {"name": "bad name"}}]}, "tools[1]"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1]"),
        ({"tools": [WEATHER] * 129}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"function": {"name": "nope"}}}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_bad_tools_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    assert refusal(tools.plan(request(**fields), HERMES, "m")) == (400, "invalid_value", param)


def test_a_model_that_cannot_take_tools_refuses_them_unless_none() -> None:
    for model in (
        tools.ModelTools(renders=False, format=None),
        tools.ModelTools(renders=True, format=None),
    ):
        got = tools.plan(request(tools=[WEATHER]), model, "m")
        assert refusal(got) == (400, "unsupported_parameter", "tools")
        assert tools.plan(request(tools=[WEATHER], tool_choice="none"), model, "m") is None


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
@pytest.mark.parametrize("parallel", [True, False])
def test_forced_calls_compile_and_read_back(fmt: ToolFormat, parallel: bool) -> None:
    """The grammar for "required" and for a named function compiles, and the text it allows
    (checked with llguidance's matcher on a recorded call) reads back as that call."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        plan = tools.plan(
            request(tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=parallel),
            tools.ModelTools(renders=True, format=fmt),
            "m",
        )
        assert isinstance(plan, tools.ToolPlan)
        c = tools.constraint(plan)
        assert c is not None
        assert grammar.problem(c) is None
        assert c.param == "tool_choice"
        text = {
            "hermes": '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n'
            "</tool_call>",
            "llama3_json": '{"name":"get_weather","parameters":{"city":"Paris"}}',
            "mistral": '[{"name":"get_weather","arguments":{"city":"Paris"}}]',
        }[fmt]
        assert _matches(c, text)
        assert not _matches(c, text.replace("Paris", "Rome"))  # the schema's enum holds
        _, calls = parse(plan.stream(ids()), text)  # the arguments as the model wrote them
        assert [(x.name, x.arguments) for x in calls] == [("get_weather", '{"city":"Paris"}')]
    auto = tools.plan(request(tools=[WEATHER]), tools.ModelTools(renders=True, format=fmt), "m")
    assert isinstance(auto, tools.ToolPlan)
    assert tools.constraint(auto) is None


def _matches(c: guides.Constraint, text: str) -> bool:
    from llguidance import LLMatcher

    from services.worker.engines.sim import END, GRAMMAR_TOKENS

    matcher = LLMatcher(
        guides.byte_tokenizer(GRAMMAR_TOKENS, END), guides.grammar_text(c), log_level=0
    )
    from services.worker.engines.sim import VOCAB

    tokens = [len(VOCAB) + b for b in text.encode()]
    return bool(matcher.consume_tokens(tokens)) and matcher.is_accepting()


def test_forced_calls_do_not_mix_with_response_format() -> None:
    plan = tools.plan(request(tools=[WEATHER], tool_choice="required"), HERMES, "m")
    assert isinstance(plan, tools.ToolPlan)
    plain = SamplingParams(max_tokens=10)
    params = tools.constrained(plain, plan)
    assert isinstance(params, SamplingParams)
    assert params.constraint == tools.constraint(plan)
    other = SamplingParams(max_tokens=10, constraint=grammar.json_object())
    assert refusal(tools.constrained(other, plan)) == (400, "invalid_value", "tool_choice")
