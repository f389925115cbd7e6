"""OpenAI response shapes for one generation of n choices: full responses, SSE chunks, their
logprobs, error events. Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from schemas.codec import encode
from schemas.inference import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    Delta,
    TextChoice,
    TextCompletion,
    TextLogprobs,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from services.worker.engines import logprobs as engine
from services.worker.engines.logprobs import StepLogprobs, reported

DONE = b"data: [DONE]\n\n"


def sse(payload: object) -> bytes:
    return b"data: " + encode(payload) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class Answer:
    """One choice as its chunks come: its text, why it ended, its tokens' logprobs."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.steps: list[StepLogprobs] = []
        self.reply: AssistantMessage | None = None  # its text read for tool calls, if it was

    def add(self, text: str, finish_reason: str | None, steps: Sequence[StepLogprobs]) -> None:
        self.parts.append(text)
        self.finish_reason = finish_reason or self.finish_reason
        self.steps.extend(steps)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def best(answers: Sequence[Answer], n: int) -> list[Answer]:
    """best_of: the n answers of highest mean token logprob (OpenAI's "highest log probability
    per token"), best first; equals keep their order, an answer without tokens comes last."""

    def score(a: Answer) -> float:
        if not a.steps:
            return -math.inf
        return math.fsum(s.chosen.logprob for s in a.steps) / len(a.steps)

    return sorted(answers, key=score, reverse=True)[:n]


def chars(steps: Sequence[StepLogprobs]) -> int:
    """How far the tokens' text moves a text choice's offset (completions' text_offset)."""
    return sum(len(s.chosen.token) for s in steps)


def _top(t: engine.TokenLogprob) -> TopLogprob:
    return TopLogprob(token=t.token, logprob=reported(t.logprob), bytes=list(t.utf8))


def chat_logprobs(steps: Sequence[StepLogprobs]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=s.chosen.token,
                logprob=reported(s.chosen.logprob),
                bytes=list(s.chosen.utf8),
                top_logprobs=[_top(t) for t in s.top],
            )
            for s in steps
        ]
    )


def text_logprobs(steps: Sequence[StepLogprobs], offset: int = 0) -> TextLogprobs:
    """The legacy shape; offset: where the first token starts in the choice's text.

    Each top_logprobs entry holds the alternatives and the sampled token (up to k + 1, as OpenAI
    says); tokens that read the same keep the likelier one's logprob."""
    tokens, values, tops, offsets = [], [], [], []
    for s in steps:
        tokens.append(s.chosen.token)
        values.append(reported(s.chosen.logprob))
        offsets.append(offset)
        offset += len(s.chosen.token)
        top: dict[str, float] = {}
        for t in (*s.top, s.chosen):
            top.setdefault(t.token, reported(t.logprob))
        tops.append(top)
    return TextLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
    )


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """A chat reply's role and, with vLLM's echo, the text every choice starts with (None: no
    echo), as shaping.reply_role and shaping.echoed say."""

    role: str = "assistant"
    echo: str | None = None


class Shape(msgspec.Struct, frozen=True, kw_only=True):
    """Identity of one response: chat or text, the ids every chunk repeats, whether its
    choices carry logprobs, and (chat) its reply's role and echo."""

    chat: bool
    id: str
    created: int
    model: str
    logprobs: bool = False
    reply: Reply = Reply()

    def message(self, answer: Answer) -> AssistantMessage:
        """A chat choice's message: its text (or what tool calls made of it), echo first."""
        message = answer.reply or AssistantMessage(content=answer.text)
        echo = self.reply.echo
        if echo is None and self.reply.role == "assistant":
            return message
        content = message.content if echo is None else echo + (message.content or "")
        return msgspec.structs.replace(message, role=self.reply.role, content=content)

    def full(self, answers: Sequence[Answer], use: Usage) -> object:
        if self.chat:
            choices = [
                ChatChoice(
                    index=i,
                    message=self.message(a),
                    finish_reason=a.finish_reason,
                    logprobs=chat_logprobs(a.steps) if self.logprobs else None,
                )
                for i, a in enumerate(answers)
            ]
            return ChatCompletion(
                id=self.id, created=self.created, model=self.model, choices=choices, usage=use
            )
        texts = [
            TextChoice(
                index=i,
                text=a.text,
                finish_reason=a.finish_reason,
                logprobs=text_logprobs(a.steps) if self.logprobs else None,
            )
            for i, a in enumerate(answers)
        ]
        return TextCompletion(
            id=self.id, created=self.created, model=self.model, choices=texts, usage=use
        )

    def first(self, n: int = 1) -> bytes:
        """Chat streams open with the reply's role, once per choice, then (echo) the echoed
        text, once per choice, as vLLM streams it; text streams with nothing."""
        if not self.chat:
            return b""
        role = Delta(role=self.reply.role, content="")
        opening = [sse(self._chunk(ChatChunkChoice(index=i, delta=role))) for i in range(n)]
        if self.reply.echo:
            echo = Delta(content=self.reply.echo)
            opening += [sse(self._chunk(ChatChunkChoice(index=i, delta=echo))) for i in range(n)]
        return b"".join(opening)

    def piece(
        self,
        text: str,
        finish_reason: str | None = None,
        *,
        index: int = 0,
        steps: Sequence[StepLogprobs] = (),
        offset: int = 0,
        calls: Sequence[ToolCallDelta] = (),
    ) -> bytes:
        """One chunk of choice `index`; steps: its tokens' logprobs (offset: where the first
        starts in that text choice's text so far); calls: tool-call deltas (chat)."""
        if self.chat:
            lp = chat_logprobs(steps) if self.logprobs and steps else None
            delta = Delta(content=text or None, tool_calls=list(calls) if calls else None)
            choice = ChatChunkChoice(
                index=index, delta=delta, finish_reason=finish_reason, logprobs=lp
            )
            return sse(self._chunk(choice))
        tlp = text_logprobs(steps, offset) if self.logprobs and steps else None
        choice_t = TextChoice(index=index, text=text, finish_reason=finish_reason, logprobs=tlp)
        return sse(
            TextCompletion(id=self.id, created=self.created, model=self.model, choices=[choice_t])
        )

    def usage_chunk(self, use: Usage) -> bytes:
        if self.chat:
            return sse(
                ChatCompletionChunk(
                    id=self.id, created=self.created, model=self.model, choices=[], usage=use
                )
            )
        return sse(
            TextCompletion(
                id=self.id, created=self.created, model=self.model, choices=[], usage=use
            )
        )

    def _chunk(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )
