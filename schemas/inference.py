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
    include_usage: bool = False


class SamplingFields(msgspec.Struct, frozen=True, kw_only=True):
    """Fields chat and text completions share."""

    model: ModelId
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    # choices; the worker serves up to its max_n (and its model's max_in_flight)
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] = 1
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    # {"<token id>": bias}; the worker checks the ids against its model's vocabulary
    logit_bias: dict[str, Bias] | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0  # vLLM's extension
    # vLLM's structured-output extension (services/worker/engines/grammar.py checks them): a
    # JSON Schema (or its text), a regex, one of these strings, a Lark grammar.
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def wanted_logprobs(self) -> int | None:
        """None: no logprobs; k: each token's logprob and its k most likely alternatives."""
        return None

    def constraint_fields(self) -> dict[str, Any]:
        """The fields that may constrain the output's text (grammar.requested reads them)."""
        return {
            "guided_json": self.guided_json,
            "guided_regex": self.guided_regex,
            "guided_choice": self.guided_choice,
            "guided_grammar": self.guided_grammar,
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
        return {}


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
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def constraint_fields(self) -> dict[str, Any]:
        return {"response_format": self.response_format, **super().constraint_fields()}

    def _asked(self) -> dict[str, bool]:
        return {
            "functions": bool(self.functions),
            "function_call": self.function_call not in (None, "none", "auto"),
            "audio": self.audio is not None,
            "modalities": self.modalities not in (None, ["text"]),
            "web_search_options": self.web_search_options is not None,  # {} asks for search
            # OpenAI refuses these on models that do not reason; none here does
            "reasoning_effort": self.reasoning_effort is not None,
            "verbosity": self.verbosity not in (None, "medium"),
        }


class CompletionRequest(SamplingFields, frozen=True, kw_only=True):
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]
    echo: bool = False
    # the sampled token's logprob and this many alternatives' (0 asks for the sampled one's)
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    # candidates generated, of which the n likeliest are answered (not streamed)
    best_of: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    def _asked(self) -> dict[str, bool]:
        return {
            "echo": self.echo,
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
