"""Chat templates from a model's tokenizer_config.json, rendered as transformers renders them
(sandboxed Jinja with loop controls, tojson, raise_exception, strftime_now; no torch), tools and
tool calls included; which message content parts a model can take."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import msgspec

from schemas.inference import ChatMessage

IMAGE_PART = "image_url"

DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# What tells whether a template renders tools: a tool of this name shows in its prompt.
_PROBE = "switchboard_probe_tool"


# transformers' marker for continue_final_message: the prompt is cut where it lands
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How one request's chat prompt is rendered (vLLM's request fields, as transformers'
    apply_chat_template takes them)."""

    add_generation_prompt: bool = True  # open the assistant's turn after the messages
    continue_final_message: bool = False  # end inside the last message, for the model to go on
    variables: dict[str, Any] = msgspec.field(default_factory=dict)  # chat_template_kwargs


DEFAULT_OPTIONS = ChatOptions()


class TemplateFailed(ValueError):
    """The template could not render these messages (its raise_exception, or a Jinja error)."""


def _environment(now: Callable[[], datetime]) -> Any:
    """transformers' chat-template environment (utils/chat_template_utils.py), so a template
    renders here exactly as `apply_chat_template` renders it."""
    import jinja2.ext
    from jinja2 import TemplateError, nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training;
        rendering keeps the body."""

        tags = {"generation"}  # noqa: RUF012 (jinja2's own declaration)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(
        x: object,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own tojson escapes HTML characters, which a prompt must not have.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[Generation, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: now().strftime(fmt)
    return env


class ChatTemplate:
    def __init__(
        self,
        source: str,
        bos_token: str = "",
        eos_token: str = "",
        now: Callable[[], datetime] = datetime.now,
    ) -> None:
        """now: what strftime_now reads (templates that write today's date)."""
        self.source = source
        try:
            self.template = _environment(now).from_string(source)
        except Exception as exc:  # a template that does not compile is the checkpoint's fault
            raise TemplateFailed(f"the chat template does not compile: {exc}") from exc
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_model_dir(cls, directory: Path) -> ChatTemplate:
        path = directory / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        source = config.get("chat_template") or DEFAULT_TEMPLATE
        if isinstance(source, list):  # the multi-template form: pick "default"
            source = next(
                (t["template"] for t in source if t.get("name") == "default"), DEFAULT_TEMPLATE
            )
        return cls(source, _token(config.get("bos_token")), _token(config.get("eos_token")))

    def render(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[dict[str, Any]] | None = None,
        options: ChatOptions = DEFAULT_OPTIONS,
    ) -> str:
        """The prompt up to where the assistant's reply begins (or, options saying so, where
        its last message would go on); tools: OpenAI's tool objects (None: the template is told
        of none). TemplateFailed when it cannot."""
        return self.render_dicts([message_dict(m) for m in messages], tools, options)

    def render_dicts(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None,
        options: ChatOptions = DEFAULT_OPTIONS,
    ) -> str:
        final = ""
        if options.continue_final_message:  # as transformers does it: mark where to cut
            if not messages or "content" not in self.source:
                raise TemplateFailed("continue_final_message: the template writes no content")
            final = messages[-1]["content"]
            messages = [*messages[:-1], {**messages[-1], "content": final + _CONTINUE_TAG}]
        try:
            rendered = str(
                self.template.render(
                    **options.variables,  # first: what the worker sets below wins
                    messages=messages,
                    tools=list(tools) if tools else None,
                    add_generation_prompt=options.add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
            )
        except Exception as exc:  # any Jinja error is the request's or the template's, not ours
            raise TemplateFailed(f"the model's chat template failed: {exc}") from exc
        return _continued(rendered, final) if options.continue_final_message else rendered

    @cached_property
    def renders_tools(self) -> bool:
        """Whether the template tells the model of the tools it is given."""
        probe = {"type": "function", "function": {"name": _PROBE, "parameters": {}}}
        try:
            rendered = self.render_dicts([{"role": "user", "content": "hi"}], [probe])
        except TemplateFailed:
            return False
        return _PROBE in rendered


def _continued(rendered: str, final: str) -> str:
    """The prompt cut where the last message's text ends (transformers' rule)."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise TemplateFailed(
            "continue_final_message: the chat template does not write the final message"
        )
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the message's trailing space


def message_dict(m: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it (transformers' convention): the keys it has, its
    calls' arguments as a mapping (templates write them with tojson) where they are JSON."""
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": c.type,
                "function": {
                    "name": c.function.name,
                    "arguments": _arguments(c.function.arguments),
                },
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _arguments(text: str) -> object:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _token(value: object) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def is_template_error(exc: BaseException) -> bool:
    """Whether exc is a chat template's refusal or failure (as an engine's tokenizer raises)."""
    if isinstance(exc, TemplateFailed):
        return True
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - jinja2 comes with every engine's dependencies
        return False
    return isinstance(exc, TemplateError)


def refused_part(messages: Sequence[ChatMessage], accepts_images: bool) -> tuple[str, str] | None:
    """Where the first content part the model cannot take is (`messages[i].content[j]`) and its
    type. Text always goes; images only to a model that takes them; audio, files and any other
    part are refused rather than dropped, which would answer a question that was not asked."""
    allowed = {"text", IMAGE_PART} if accepts_images else {"text"}
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type not in allowed:
                    return f"messages[{i}].content[{j}]", part.type
    return None
