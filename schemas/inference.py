"""OpenAI-compatible request and response subset (chat and text completions). No I/O.

Requests accept unknown fields (clients send extra parameters); OpenAI features we know of but
do not implement are decoded so the worker refuses them by name (unsupported()), never answers
as if they had not been asked for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from schemas.base import ModelId

Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
Bias = Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]
MAX_N = 128  # OpenAI's limit on n; a worker serves at most its configured max_n


class ContentPart(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A call the assistant made: in a response, and in the history a client sends back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content if part.type == "text")


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    include_usage: bool | None = None  # None: false


MAX_STOP_TOKEN_IDS = 1024


class SamplingFields(msgspec.Struct, frozen=True, kw_only=True):
    """Fields chat and text completions share.

    null is OpenAI's "the default" (the official client sends a None argument as null), so
    every optional field takes it; the readers (services/worker/core.py, choices.py) apply the
    defaults written in the comments."""

    model: ModelId
    stream: bool | None = None  # None: false
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None  # None: 1.0
    top_p: TopP | None = None  # None: 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None  # vLLM's; None or 0: off
    seed: int | None = None
    stop: str | list[str] | None = None
    # choices; the worker serves up to its max_n (and its model's max_in_flight). Read as
    # `n` (the property below applies the default); declared apart so null decodes.
    choices_asked: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] | None = msgspec.field(
        default=None, name="n"
    )
    presence_penalty: Penalty | None = None  # None: 0
    frequency_penalty: Penalty | None = None  # None: 0
    # {"<token id>": bias}; the worker checks the ids against its model's vocabulary
    logit_bias: dict[str, Bias] | None = None
    # vLLM's extensions. Served: repetition_penalty (None: 1.0), min_p (None: 0), min_tokens
    # (None: 0), ignore_eos, stop_token_ids (checked against the vocabulary).
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    min_tokens: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: (
        Annotated[
            list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=MAX_STOP_TOKEN_IDS)
        ]
        | None
    ) = None
    # include_stop_str_in_output (None: false): the stop string (or stop_token_ids token) that
    # ended the text stays in it; skip_special_tokens (None: true): special tokens' text is
    # left out of the answer.
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # ... refused by name unless neutral (unsupported()):
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    use_beam_search: bool | None = None
    # Structured output (services/worker/engines/grammar.py checks them): OpenAI's
    # response_format (vLLM serves it on completions too), vLLM's guided_* (a JSON Schema or its
    # text, a regex, one of these strings, a Lark grammar) and their successor
    # structured_outputs ({"json" | "regex" | "choice" | "grammar" | "json_object": ...}).
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None  # the regex JSON's whitespace matches
    structured_outputs: Any = None

    @property
    def n(self) -> int:
        return 1 if self.choices_asked is None else self.choices_asked

    def wanted_logprobs(self) -> int | None:
        """None: no logprobs; k: each token's logprob and its k most likely alternatives."""
        return None

    def constraint_fields(self) -> dict[str, Any]:
        """The fields that may constrain the output's text (grammar.requested reads them)."""
        return {
            "response_format": self.response_format,
            "guided_json": self.guided_json,
            "guided_regex": self.guided_regex,
            "guided_choice": self.guided_choice,
            "guided_grammar": self.guided_grammar,
            "structured_outputs": self.structured_outputs,
        }

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)

    def unsupported(self) -> str | None:
        """The first parameter this request sets to something no engine here can do, if any.

        OpenAI features no engine here implements are decoded so that a request asking for one
        is refused by name instead of answered as if it had not asked; their neutral values (0,
        null, false) are accepted, since many clients always send them."""
        return next((param for param, yes in self._asked().items() if yes), None)

    def _asked(self) -> dict[str, bool]:
        return {
            "bad_words": bool(self.bad_words),
            "prompt_logprobs": self.prompt_logprobs is not None,  # 0 asks for the prompt's
            "use_beam_search": bool(self.use_beam_search),
        }


class ChatCompletionRequest(SamplingFields, frozen=True, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None  # needs logprobs
    tools: list[Any] | None = None  # checked by the worker (services/worker/tools.py)
    functions: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # None: true, OpenAI's default
    function_call: Any = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    moderation: Any = None
    # vLLM's chat extensions. How the prompt is rendered (services/worker/shaping.py reads
    # them): add_generation_prompt (None: true) opens the assistant's turn; continue_final_message
    # (None: false) continues the last message instead; chat_template_kwargs, extra variables for
    # the template. echo (None: false): the reply starts with the last message when it is of the
    # reply's role. A client's own chat_template is refused (unsupported()).
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool | None = None
    chat_template: str | None = None

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def _asked(self) -> dict[str, bool]:
        return {
            **super()._asked(),
            "functions": bool(self.functions),
            "function_call": self.function_call not in (None, "none", "auto"),
            "audio": self.audio is not None,
            "modalities": self.modalities not in (None, ["text"]),
            "web_search_options": self.web_search_options is not None,  # {} asks for search
            # OpenAI refuses these on models that do not reason; none here does
            "reasoning_effort": self.reasoning_effort is not None,
            "verbosity": self.verbosity not in (None, "medium"),
            # it asks to block flagged input or output; nothing here moderates
            "moderation": self.moderation is not None,
            # a template is code: a client's would run in the worker (docs/worker.md)
            "chat_template": bool(self.chat_template),
        }


class CompletionRequest(SamplingFields, frozen=True, kw_only=True):
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]
    echo: bool | None = None  # None: false
    # the sampled token's logprob and this many alternatives' (0 asks for the sampled one's)
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    # candidates generated, of which the n likeliest are answered (not streamed)
    best_of: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    def _asked(self) -> dict[str, bool]:
        return {
            **super()._asked(),
            "echo": bool(self.echo),
            "suffix": bool(self.suffix),
        }

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# ---- responses ----


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str = "assistant"
    content: str | None = ""  # None: only tool calls
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET  # left out when none


class TopLogprob(msgspec.Struct, frozen=True, kw_only=True):
    """A token and its logprob (chat); bytes: its UTF-8 bytes (a token may be part of a
    character)."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob, frozen=True, kw_only=True):
    """A generated token's logprob, and its step's most likely tokens (best first)."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct, frozen=True, kw_only=True):
    """A chat choice's (or a streamed delta's) logprobs."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A streamed call: its first delta has id, type and name; the rest, argument pieces."""

    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionDelta


class Delta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TextLogprobs(msgspec.Struct, frozen=True, kw_only=True):
    """A text choice's logprobs (the legacy shape), one entry per generated token each.

    top_logprobs: each token's most likely alternatives and the token itself, token -> logprob;
    text_offset: where each token starts in the choice's text (continuing across a stream)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: TextLogprobs | None = None


class TextCompletion(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "switchboard"


class ModelList(msgspec.Struct, frozen=True, kw_only=True):
    object: str = "list"
    data: list[ModelCard]
