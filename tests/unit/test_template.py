"""Chat templates render as transformers renders them: loop controls, tojson, strftime_now,
raise_exception, tools and tool calls; a template's failure is a value the worker refuses."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
import pytest

from schemas.inference import ChatMessage
from services.worker.engines.demo_model import CHAT_TEMPLATE
from services.worker.engines.sim import SimEngine
from services.worker.engines.template import (
    ChatOptions,
    ChatTemplate,
    TemplateFailed,
    is_template_error,
    message_dict,
)
from services.worker.tool_formats import detect
from services.worker.tool_prompts import for_engine
from tests.unit.test_tools import TIME, WEATHER

HISTORY: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris, and the time?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 °C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
]
# A Llama 3.1 style excerpt: {% break %}, strftime_now, tojson with indent, raise_exception.
LLAMA_LIKE = (
    "{% set date = strftime_now('%d %b %Y') %}<|start|>Today: {{ date }}\n"
    "{% if tools %}{% for t in tools %}{{ t | tojson(indent=2) }}\n{% endfor %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% break %}"
    "{% endif %}{% endfor %}"
    "{% if messages | length > 9 %}{{ raise_exception('too many messages') }}{% endif %}"
    "{% generation %}<|python_tag|>{% endgeneration %}"
)


def messages(raw: list[Any]) -> list[ChatMessage]:
    return msgspec.convert(raw, list[ChatMessage])


def test_demo_template_matches_transformers_with_tools_and_history() -> None:
    pytest.importorskip("jinja2")
    from transformers.utils.chat_template_utils import render_jinja_template

    ours = ChatTemplate(CHAT_TEMPLATE, "<s>", "</s>")
    for raw, tools in (
        (HISTORY, [WEATHER, TIME]),
        (HISTORY[1:], [WEATHER]),  # no system message: the tools get a system turn
        (HISTORY[:2], None),
    ):
        dicts = [message_dict(m) for m in messages(raw)]
        theirs = render_jinja_template(
            [dicts],
            tools=tools,
            chat_template=CHAT_TEMPLATE,
            add_generation_prompt=True,
            bos_token="<s>",
            eos_token="</s>",
        )[0][0]
        assert ours.render(messages(raw), tools) == theirs
    rendered = ours.render(messages(HISTORY), [WEATHER])
    assert '"city": {"enum": ["Paris", "Nice"]}' in rendered  # the tools, as JSON
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in rendered  # the call
    assert "<tool_response>\nsunny, 21 °C\n</tool_response>" in rendered  # non-ASCII kept
    assert ours.renders_tools
    assert detect(ours.source) == "hermes"


def test_demo_template_without_tools_is_unchanged() -> None:
    ours = ChatTemplate(CHAT_TEMPLATE, "<s>", "</s>")
    assert ours.render(messages(HISTORY[:2])) == (
        "<s><|system|>\nYou are terse.<|end|>\n<|user|>\nWeather in Paris, and the time?<|end|>"
        "\n<|assistant|>\n"
    )


def test_loop_controls_strftime_tojson_and_generation() -> None:
    template = ChatTemplate(LLAMA_LIKE, now=lambda: datetime(2025, 7, 26))
    out = template.render(messages(HISTORY), [WEATHER])
    assert out.startswith('<|start|>Today: 26 Jul 2025\n{\n  "type": "function",')
    assert out.endswith("Weather in Paris, and the time?<|python_tag|>")  # broke at the first
    assert template.renders_tools
    assert detect(template.source) == "llama3_json"


def test_template_failures_are_values() -> None:
    template = ChatTemplate(LLAMA_LIKE)
    with pytest.raises(TemplateFailed, match="too many messages") as failed:
        template.render(messages([{"role": "user", "content": "x"}] * 10))
    assert is_template_error(failed.value)
    with pytest.raises(TemplateFailed, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    # the sandbox: no reaching Python's internals from a template
    with pytest.raises(TemplateFailed):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(messages(HISTORY[:1]))
    assert not is_template_error(ValueError("x"))


def test_a_template_without_tools_says_so() -> None:
    plain = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert not plain.renders_tools
    assert detect(plain.source) is None


def test_the_sim_renders_tools_with_the_demo_template() -> None:
    template = for_engine(SimEngine("m"))
    assert template is not None
    assert template.source == CHAT_TEMPLATE
    assert for_engine(object()) is None


CONTINUED: list[Any] = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "It is "},  # trailing space: the template keeps it
]


@pytest.mark.parametrize(
    "options",
    [
        ChatOptions(add_generation_prompt=False),
        ChatOptions(add_generation_prompt=False, continue_final_message=True),
        ChatOptions(variables={"unused": [1, 2]}),
    ],
)
def test_options_render_as_transformers_renders_them(options: ChatOptions) -> None:
    """add_generation_prompt, continue_final_message (transformers' cut) and extra variables."""
    from transformers.utils.chat_template_utils import render_jinja_template

    ours = ChatTemplate(CHAT_TEMPLATE, "<s>", "</s>")
    for raw, tools in ((CONTINUED, None), (HISTORY, [WEATHER])):
        dicts = [message_dict(m) for m in messages(raw)]
        theirs = render_jinja_template(
            [dicts],
            tools=tools,
            chat_template=CHAT_TEMPLATE,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message,
            bos_token="<s>",
            eos_token="</s>",
            **options.variables,
        )[0][0]
        assert ours.render(messages(raw), tools, options) == theirs
    continued = ours.render(messages(CONTINUED), None, options)
    if options.continue_final_message:
        assert continued.endswith("<|assistant|>\nIt is ")


def test_variables_reach_the_template_and_a_lost_final_message_is_refused() -> None:
    template = ChatTemplate("{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    hi = messages([{"role": "user", "content": "hi"}])
    assert template.render(hi, options=ChatOptions(variables={"greeting": "yo "})) == "yo hi"
    dropped = ChatTemplate("{% for m in messages[:-1] %}{{ m['content'] }}{% endfor %}")
    going = ChatOptions(add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(TemplateFailed, match="final message"):
        dropped.render(messages(CONTINUED), options=going)
