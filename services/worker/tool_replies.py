"""A chat reply with tools in play, as OpenAI shapes it: whole (message.tool_calls, content null
when it only calls) or streamed (delta.tool_calls), finish_reason "tool_calls". Pure."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from schemas.inference import AssistantMessage
from services.worker.engines.logprobs import StepLogprobs
from services.worker.openai import Answer, Shape
from services.worker.tool_stream import ToolStream, parse, split
from services.worker.tools import finish_reason


def settle(answer: Answer, reader: ToolStream) -> None:
    """Read answer's whole text for calls: its reply and finish_reason become what they say."""
    content, calls = parse(reader, answer.text)
    answer.reply = AssistantMessage(
        content=content,
        tool_calls=[c.tool_call() for c in calls] if calls else msgspec.UNSET,
    )
    answer.finish_reason = finish_reason(answer.finish_reason, bool(calls))


def pieces(
    shape: Shape,
    reader: ToolStream,
    text: str,
    finish: str | None,
    *,
    index: int,
    steps: Sequence[StepLogprobs] = (),
) -> list[bytes]:
    """One engine chunk of choice index as SSE chunks: the content it lets go (with the chunk's
    logprobs), each call it completes (name, then arguments) or a live call's start and argument
    pieces as they come, then its finish_reason, if last."""
    events = reader.feed(text)
    if finish is not None:
        events.extend(reader.end())
    content, calls = split(events)
    out = []
    if content or steps:
        out.append(shape.piece(content, index=index, steps=steps))
    for call in calls:
        out.extend(shape.piece("", index=index, calls=[delta]) for delta in call.deltas())
    if finish is not None:
        out.append(shape.piece("", finish_reason(finish, reader.calls > 0), index=index))
    return out
