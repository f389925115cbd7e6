"""Generated text, piece by piece, into content and tool calls: OpenAI's `tool_calls`, whole or
as stream deltas. Pure: call ids come from the caller.

Text that may be the start of a call marker is held back until the next piece tells; a call
goes out once its text is complete (its name, then its arguments), so one that turns out
malformed (bad JSON, an undeclared function) still goes out as the content it is, never lost.
Whitespace just before a call, and after the last one, is dropped (it only separates them).

Live (a call forced by the grammar, tool_choice "required" or a named function, so the text
can only be calls): each call's name goes out once read, then its arguments piece by piece as
they are generated, as OpenAI streams them; the text outside the call objects (markers,
separators) is dropped. Pieces cannot be taken back, so "auto" replies are never read live.
A forced reply cut off (finish_reason "length") keeps the arguments it had, as OpenAI's does.
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
    Depth,
    ToolFormat,
    call_head,
    parse_body,
    read_call,
)

Mode = Literal["start", "text", "call", "rest", "live"]
Phase = Literal["between", "head", "args", "tail", "whole"]


def head_delta(index: int, call_id: str, name: str) -> ToolCallDelta:
    """A call's first delta, as OpenAI streams it: its place, id, type and name, no arguments."""
    return ToolCallDelta(
        index=index, id=call_id, type="function", function=FunctionDelta(name=name, arguments="")
    )


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
            head_delta(self.index, self.id, self.name),
            ToolCallDelta(index=self.index, function=FunctionDelta(arguments=self.arguments)),
        )


class CallHead(msgspec.Struct, frozen=True, kw_only=True):
    """A live call's start: its place, id and function; its arguments follow in ArgsPieces."""

    index: int
    id: str
    name: str

    def deltas(self) -> tuple[ToolCallDelta, ...]:
        return (head_delta(self.index, self.id, self.name),)


class ArgsPiece(msgspec.Struct, frozen=True, kw_only=True):
    """The next piece of a live call's arguments, as generated."""

    index: int
    arguments: str

    def deltas(self) -> tuple[ToolCallDelta, ...]:
        return (ToolCallDelta(index=self.index, function=FunctionDelta(arguments=self.arguments)),)


CallEvent = CallOut | CallHead | ArgsPiece
Event = str | CallEvent


class ToolStream:
    """One choice's text as it comes (feed), then its end (end): content and calls, in order."""

    def __init__(
        self,
        fmt: ToolFormat,
        names: frozenset[str],
        new_id: Callable[[], str],
        *,
        parallel: bool = True,
        live: bool = False,
    ) -> None:
        """names: the declared functions (a call to another is content); parallel False: only
        the first call is answered (OpenAI's parallel_tool_calls), later ones are dropped; live:
        the reply is forced to be calls, whose arguments go out as they come."""
        self.fmt, self.names, self.new_id, self.parallel = fmt, names, new_id, parallel
        # llama3_json and mistral decide at the reply's first character whether it is calls:
        # an engine that drops special tokens drops <|python_tag|> and [TOOL_CALLS] from the text
        self.mode: Mode = "text" if fmt == "hermes" else "start"
        self.mode = "live" if live else self.mode
        self.phase: Phase = "between"
        self.depth = Depth(0)
        self.seen = 0  # phase "whole": how much of buf self.depth has read
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
            steps = {"start": self._start, "text": self._text, "call": self._call}
            step = steps.get(self.mode, self._live if self.mode == "live" else self._rest)
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

    def _live(self, final: bool) -> bool:
        if self.phase == "between":
            at = self.buf.find("{")  # what comes before a call object is markers, separators
            self.buf, self.phase = ("", self.phase) if at < 0 else (self.buf[at:], "head")
            return at >= 0
        if self.phase == "head":
            return self._head(final)
        seen = self.seen if self.phase == "whole" else 0  # "whole" keeps its text until closed
        end = self.depth.close(self.buf[seen:])
        self.seen = len(self.buf) if end is None else 0
        if end is None and self.phase == "whole":
            if final:  # cut off: the content it is
                self._content(self.buf)
                self.buf = ""
            return False
        done = len(self.buf) if end is None else seen + end
        if self.phase == "args" and done:
            self.out.append(ArgsPiece(index=self.calls - 1, arguments=self.buf[:done]))
        elif self.phase == "whole":
            self._whole(self.buf[:done])
        self.buf = self.buf[done:]
        if end is not None:  # the arguments closed: then the rest of their call object
            self.phase = "tail" if self.phase == "args" else "between"
            self.depth = Depth(1)
        return end is not None

    def _head(self, final: bool) -> bool:
        head = call_head(self.buf)
        if head is None:
            if final:  # cut off before its arguments (or not a call): the content it is
                self._content(self.buf)
                self.buf = ""
            return False
        if isinstance(head, int):
            self._whole(self.buf[:head])
            self.buf, self.phase = self.buf[head:], "between"
        elif head.name in self.names and (self.parallel or not self.calls):
            self.out.append(CallHead(index=self.calls, id=self.new_id(), name=head.name))
            self.calls += 1
            self.buf, self.phase, self.depth = self.buf[head.at :], "args", Depth(0)
        else:
            self.phase, self.depth, self.seen = "whole", Depth(0), 0
        return True

    def _whole(self, text: str) -> None:
        """A call object read whole (not live): a call, or the content it is."""
        call = read_call(text, self.names)
        if call is None:
            self._content(text)
        elif self.parallel or not self.calls:
            self.out.append(
                CallOut(
                    index=self.calls, id=self.new_id(), name=call.name, arguments=call.arguments
                )
            )
            self.calls += 1

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


def split(events: Sequence[Event]) -> tuple[str, list[CallEvent]]:
    """Events as the content they add and the calls (or calls' pieces) they make."""
    text = "".join(e for e in events if isinstance(e, str))
    return text, [e for e in events if not isinstance(e, str)]


def whole(events: Sequence[CallEvent]) -> list[CallOut]:
    """Calls' events as the calls they make: a live call's pieces joined."""
    calls: list[CallOut] = []
    for e in events:
        if isinstance(e, CallHead):
            calls.append(CallOut(index=e.index, id=e.id, name=e.name, arguments=""))
        elif isinstance(e, ArgsPiece):
            last = calls[-1]
            calls[-1] = msgspec.structs.replace(last, arguments=last.arguments + e.arguments)
        else:
            calls.append(e)
    return calls


def parse(stream: ToolStream, text: str) -> tuple[str | None, list[CallOut]]:
    """A whole reply: its content (None when it is only calls, as OpenAI has it), its calls."""
    content, events = split([*stream.feed(text), *stream.end()])
    calls = whole(events)
    return (content or None) if calls else content, calls
