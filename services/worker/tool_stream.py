"""Generated text, piece by piece, into content and tool calls: OpenAI's `tool_calls`, whole or
as stream deltas. Pure: call ids come from the caller.

Text that may be the start of a call marker is held back until the next piece tells; a call
goes out once its text is complete (its name, then its arguments), so one that turns out
malformed (bad JSON, an undeclared function) still goes out as the content it is, never lost.
Whitespace just before a call, and after the last one, is dropped (it only separates them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import msgspec

from schemas.inference import FunctionCall, FunctionDelta, ToolCall, ToolCallDelta
from services.worker.tool_formats import (
    HERMES_END,
    HERMES_START,
    MISTRAL_START,
    PYTHON_TAG,
    ToolFormat,
    parse_body,
)

Mode = Literal["start", "text", "call", "rest"]


class CallOut(msgspec.Struct, frozen=True, kw_only=True):
    """A call read from one choice's text: its place among the choice's calls, id, function."""

    index: int
    id: str
    name: str
    arguments: str

    def tool_call(self) -> ToolCall:
        return ToolCall(id=self.id, function=FunctionCall(name=self.name, arguments=self.arguments))

    def deltas(self) -> tuple[ToolCallDelta, ToolCallDelta]:
        """As OpenAI streams a call: id, type and name first, then its arguments."""
        return (
            ToolCallDelta(
                index=self.index,
                id=self.id,
                type="function",
                function=FunctionDelta(name=self.name, arguments=""),
            ),
            ToolCallDelta(index=self.index, function=FunctionDelta(arguments=self.arguments)),
        )


Event = str | CallOut


class ToolStream:
    """One choice's text as it comes (feed), then its end (end): content and calls, in order."""

    def __init__(
        self,
        fmt: ToolFormat,
        names: frozenset[str],
        new_id: Callable[[], str],
        *,
        parallel: bool = True,
    ) -> None:
        """names: the declared functions (a call to another is content); parallel False: only
        the first call is answered (OpenAI's parallel_tool_calls), later ones are dropped."""
        self.fmt, self.names, self.new_id, self.parallel = fmt, names, new_id, parallel
        # llama3_json and mistral decide at the reply's first character whether it is calls:
        # an engine that drops special tokens drops <|python_tag|> and [TOOL_CALLS] from the text
        self.mode: Mode = "text" if fmt == "hermes" else "start"
        self.marker = {"hermes": HERMES_START, "mistral": MISTRAL_START}.get(fmt)
        self.opened = ""  # the marker that began the calls being read
        self.buf = ""  # not yet sent: a possible marker's start, or a call's unfinished text
        self.held = ""  # trailing whitespace of the content: sent only if content follows
        self.calls = 0
        self.out: list[Event] = []

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        self._scan(final=False)
        return self._take()

    def end(self) -> list[Event]:
        self._scan(final=True)
        if self.held and not self.calls:
            self.out.append(self.held)
        self.held = ""
        return self._take()

    def _take(self) -> list[Event]:
        out, self.out = self.out, []
        return out

    def _scan(self, final: bool) -> None:
        while True:
            step = {"start": self._start, "text": self._text, "call": self._call}.get(
                self.mode, self._rest
            )
            if not step(final):
                return

    def _start(self, final: bool) -> bool:
        head = self.buf.lstrip()
        tag, bare = (PYTHON_TAG, "{") if self.fmt == "llama3_json" else (MISTRAL_START, "[")
        if head.startswith(bare) or (self.fmt == "llama3_json" and head.startswith(tag)):
            self.mode = "rest"  # (a mistral reply that begins with its marker is read as text)
        elif final or (head and not tag.startswith(head)):
            self.mode = "text"
        else:
            return False  # only whitespace, or a possible marker, so far
        return True

    def _text(self, final: bool) -> bool:
        marker = self.marker
        at = self.buf.find(marker) if marker else -1
        if marker and at >= 0:
            self._content(self.buf[:at])  # its trailing whitespace held: dropped if a call
            self.opened = marker
            self.buf = self.buf[at + len(marker) :]
            self.mode = "call" if self.fmt == "hermes" else "rest"
            return True
        keep = 0 if final or not marker else _partial(self.buf, marker)
        self._content(self.buf[: len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep :]
        return False

    def _call(self, final: bool) -> bool:
        at = self.buf.find(HERMES_END)
        if at < 0 and not final:
            return False
        body = self.buf if at < 0 else self.buf[:at]
        end = len(self.buf) if at < 0 else at + len(HERMES_END)
        self._close(body, HERMES_START + self.buf[:end])
        self.buf, self.mode = self.buf[end:], "text"
        return True

    def _rest(self, final: bool) -> bool:
        if final:
            self._close(self.buf, self.opened + self.buf)
            self.buf = ""
        return False

    def _close(self, body: str, raw: str) -> None:
        calls = parse_body(self.fmt, body, self.names)
        if calls is None:
            self._content(raw)
            return
        self.held = ""
        for call in calls:
            if self.parallel or not self.calls:
                self.out.append(
                    CallOut(
                        index=self.calls, id=self.new_id(), name=call.name, arguments=call.arguments
                    )
                )
                self.calls += 1

    def _content(self, text: str) -> None:
        text = self.held + text
        body = text.rstrip()
        if body:
            self.out.append(body)
        self.held = text[len(body) :]


def _partial(text: str, marker: str) -> int:
    """How many of text's last characters could begin marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def split(events: Sequence[Event]) -> tuple[str, list[CallOut]]:
    """Events as the content they add and the calls they make."""
    text = "".join(e for e in events if isinstance(e, str))
    return text, [e for e in events if isinstance(e, CallOut)]


def parse(stream: ToolStream, text: str) -> tuple[str | None, list[CallOut]]:
    """A whole reply: its content (None when it is only calls, as OpenAI has it), its calls."""
    content, calls = split([*stream.feed(text), *stream.end()])
    return (content or None) if calls else content, calls
