"""shaping.py's vLLM chat fields: how the prompt is rendered (add_generation_prompt,
continue_final_message, chat_template_kwargs), the reply's role and echo, a client's own
chat_template refused, guided_whitespace_pattern for JSON only, and the SamplingParams the
decoding fields become."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from schemas.inference import ChatCompletionRequest
from services.common.errors import ApiError
from services.worker import shaping
from services.worker.engines import guides
from services.worker.engines.params import EngineLimits, SamplingParams
from services.worker.engines.sim import END, GRAMMAR_TOKENS, VOCAB
from services.worker.engines.template import ChatOptions
from services.worker.openai import Answer, Reply, Shape

SAID: list[Any] = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "the fleet"},
]


def chat(messages: list[Any] | None = None, **fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": messages or SAID, **fields}
    return msgspec.json.decode(json.dumps(body), type=ChatCompletionRequest)


@pytest.mark.parametrize(
    ("fields", "options"),
    [
        ({}, ChatOptions()),
        ({"add_generation_prompt": None}, ChatOptions()),
        ({"add_generation_prompt": False}, ChatOptions(add_generation_prompt=False)),
        (
            {"add_generation_prompt": False, "continue_final_message": True},
            ChatOptions(add_generation_prompt=False, continue_final_message=True),
        ),
        (  # chat_template_kwargs may set both, and win (vLLM's precedence)
            {
                "add_generation_prompt": True,
                "chat_template_kwargs": {
                    "add_generation_prompt": False,
                    "continue_final_message": True,
                    "enable_thinking": False,
                },
            },
            ChatOptions(
                add_generation_prompt=False,
                continue_final_message=True,
                variables={"enable_thinking": False},
            ),
        ),
    ],
)
def test_chat_options(fields: dict[str, Any], options: ChatOptions) -> None:
    assert shaping.chat_options(chat(**fields)) == options


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"continue_final_message": True}, "continue_final_message"),  # and the default true
        (
            {"continue_final_message": True, "add_generation_prompt": True},
            "continue_final_message",
        ),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"eos_token": "x"}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"add_generation_prompt": "no"}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"not a name": 1}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {f"k{i}": i for i in range(65)}}, "chat_template_kwargs"),
    ],
)
def test_chat_options_refused(fields: dict[str, Any], param: str) -> None:
    got = shaping.chat_options(chat(**fields))
    assert isinstance(got, ApiError)
    assert (got.status, got.code, got.param) == (400, "invalid_value", param)


def test_a_clients_chat_template_is_refused_by_name() -> None:
    got = shaping.unsupported(chat(chat_template="{{ messages }}"))
    assert isinstance(got, ApiError)
    assert (got.code, got.param) == ("unsupported_parameter", "chat_template")
    assert shaping.unsupported(chat(chat_template=None)) is None
    assert shaping.unsupported(chat(chat_template="")) is None


@pytest.mark.parametrize(
    ("messages", "fields", "role", "echo"),
    [
        (SAID, {}, "assistant", None),
        (SAID, {"echo": True}, "assistant", "the fleet"),  # the last message is the assistant's
        (SAID[:1], {"echo": True}, "assistant", ""),  # a user's: nothing to echo
        (SAID[:1], {"echo": True, "add_generation_prompt": False}, "user", "hi"),
        (SAID, {"echo": False}, "assistant", None),
    ],
)
def test_reply_role_and_echo(
    messages: list[Any], fields: dict[str, Any], role: str, echo: str | None
) -> None:
    req = chat(messages, **fields)
    options = shaping.chat_options(req)
    assert isinstance(options, ChatOptions)
    assert shaping.reply_role(req, options) == role
    assert shaping.echoed(req, role) == echo


def test_echo_and_role_shape_the_reply() -> None:
    shape = Shape(chat=True, id="c", created=0, model="m", reply=Reply(echo="the fleet"))
    answer = Answer()
    answer.add(" routes", "stop", ())
    full = msgspec.json.decode(msgspec.json.encode(shape.full([answer], _usage())))
    assert full["choices"][0]["message"] == {"role": "assistant", "content": "the fleet routes"}
    opening = shape.first(2).decode()
    assert opening.count('"content":"the fleet"') == 2  # after the role chunks, one a choice
    user = Shape(chat=True, id="c", created=0, model="m", reply=Reply(role="user"))
    assert b'"role":"user"' in user.first()
    body = msgspec.json.decode(msgspec.json.encode(user.full([answer], _usage())))
    assert body["choices"][0]["message"] == {"role": "user", "content": " routes"}
    assert b'"content":"the fleet"' not in Shape(chat=True, id="c", created=0, model="m").first()


def _usage() -> Any:
    from services.worker.openai import usage

    return usage(1, 1)


LIMITS = EngineLimits(max_batch=1, max_context=100)


def test_decoding_fields_reach_the_engine() -> None:
    plain = shaping.sampling(chat(), 10, LIMITS, 24)
    assert isinstance(plain, SamplingParams)
    assert (plain.include_stop_str_in_output, plain.skip_special_tokens) == (False, True)
    asked = shaping.sampling(
        chat(include_stop_str_in_output=True, skip_special_tokens=False), 10, LIMITS, 24
    )
    assert isinstance(asked, SamplingParams)
    assert (asked.include_stop_str_in_output, asked.skip_special_tokens) == (True, False)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),  # nothing to shape
        ({"guided_regex": "a+", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        (
            {"response_format": {"type": "json_object"}, "guided_whitespace_pattern": "(a"},
            "guided_whitespace_pattern",  # not a regex
        ),
        (
            {"structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
            "structured_outputs",
        ),
    ],
)
def test_whitespace_pattern_shapes_json_only(fields: dict[str, Any], param: str) -> None:
    got = shaping.sampling(chat(**fields), 10, LIMITS, 24)
    assert isinstance(got, ApiError)
    assert (got.code, got.param) == ("invalid_value", param)


@pytest.mark.parametrize(
    "fields",
    [
        {"response_format": {"type": "json_object"}, "guided_whitespace_pattern": " "},
        {"guided_json": {"type": "object"}, "guided_whitespace_pattern": " "},
        {"structured_outputs": {"json_object": True, "whitespace_pattern": " "}},
    ],
)
def test_whitespace_pattern_lets_json_have_its_whitespace(fields: dict[str, Any]) -> None:
    """Compact JSON allows no space after "{"; the pattern " " allows one."""
    got = shaping.sampling(chat(**fields), 10, LIMITS, 24)
    assert isinstance(got, SamplingParams)
    assert got.constraint is not None
    assert got.constraint.whitespace == " "
    grammars = guides.Grammars(guides.byte_tokenizer(GRAMMAR_TOKENS, END))
    space, brace = len(VOCAB) + ord(" "), len(VOCAB) + ord("{")
    for constraint, allowed in (
        (got.constraint, True),
        (msgspec.structs.replace(got.constraint, whitespace=None), False),
    ):
        guide = grammars.guide(constraint)
        assert guide.advance(brace)
        assert bool(guide.allowed()[space]) is allowed
