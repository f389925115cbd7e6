"""OpenAI response shapes for one generation: full responses, SSE chunks, error events. Pure."""

from __future__ import annotations

import msgspec

from schemas.codec import encode
from schemas.inference import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Delta,
    TextChoice,
    TextCompletion,
    Usage,
)

DONE = b"data: [DONE]\n\n"


def sse(payload: object) -> bytes:
    return b"data: " + encode(payload) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class Shape(msgspec.Struct, frozen=True, kw_only=True):
    """Identity of one response: chat or text, and the ids every chunk repeats."""

    chat: bool
    id: str
    created: int
    model: str

    def full(self, text: str, finish_reason: str | None, use: Usage) -> object:
        if self.chat:
            choice = ChatChoice(
                index=0, message=AssistantMessage(content=text), finish_reason=finish_reason
            )
            return ChatCompletion(
                id=self.id, created=self.created, model=self.model, choices=[choice], usage=use
            )
        choice_t = TextChoice(index=0, text=text, finish_reason=finish_reason)
        return TextCompletion(
            id=self.id, created=self.created, model=self.model, choices=[choice_t], usage=use
        )

    def first(self) -> bytes | None:
        """Chat streams open with the assistant role; text streams have no preamble."""
        if not self.chat:
            return None
        return sse(self._chunk(Delta(role="assistant", content=""), None))

    def piece(self, text: str, finish_reason: str | None = None) -> bytes:
        if self.chat:
            delta = Delta(content=text) if text else Delta()
            return sse(self._chunk(delta, finish_reason))
        choice = TextChoice(index=0, text=text, finish_reason=finish_reason)
        return sse(
            TextCompletion(id=self.id, created=self.created, model=self.model, choices=[choice])
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

    def _chunk(self, delta: Delta, finish_reason: str | None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )
