"""The tool-call formats models write, told apart by their chat templates, and how each one's
calls are read from the generated text. Pure.

hermes: Hermes, Qwen 2/2.5/3 and the demo checkpoint: each call is
  <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>, text before it is content.
llama3_json: Llama 3.1/3.2/3.3: the whole reply is the call(s), {"name": "f", "parameters":
  {...}} (after <|python_tag|> when the template asks for it), several separated by ";".
mistral: Mistral, Mixtral: [TOOL_CALLS] then a JSON list of {"name", "arguments"}, or (v11+
  tokenizers) name[ARGS]{...} per call, each after its own [TOOL_CALLS].
"""

from __future__ import annotations

import json
from typing import Literal

import msgspec

ToolFormat = Literal["hermes", "llama3_json", "mistral"]
FORMATS: tuple[ToolFormat, ...] = ("hermes", "llama3_json", "mistral")

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_START, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"


class Call(msgspec.Struct, frozen=True, kw_only=True):
    """One call read from the text: a declared function's name, its arguments as JSON text."""

    name: str
    arguments: str


def detect(template_source: str) -> ToolFormat | None:
    """The format a chat template teaches its model (None: none this worker reads)."""
    if HERMES_START in template_source:
        return "hermes"
    if MISTRAL_START in template_source:
        return "mistral"
    if PYTHON_TAG in template_source or "ipython" in template_source:
        return "llama3_json"
    return None


def call_id(fmt: ToolFormat, random_hex: str) -> str:
    """A call's id from fresh randomness: OpenAI's call_<24>, but Mistral's templates refuse any
    id that is not 9 letters or digits when the call comes back in the history."""
    return random_hex[:9] if fmt == "mistral" else "call_" + random_hex[:24]


def parse_body(fmt: ToolFormat, body: str, names: frozenset[str]) -> list[Call] | None:
    """The calls in body (hermes: one call's text between its tags; the others: everything after
    the marker), or None when it is not well-formed calls of declared functions."""
    if fmt == "hermes":
        one = read_call(body, names)
        return None if one is None else [one]
    if fmt == "llama3_json":
        return _calls(_values(body.removeprefix(PYTHON_TAG), 0, ";"), names)
    return _mistral(body, names)


def read_call(text: str, names: frozenset[str]) -> Call | None:
    """One call object's whole text as a call of a declared function, or None."""
    values = _values(text, 0, "")
    return _call(values[0], names) if values and len(values) == 1 else None


def _mistral(body: str, names: frozenset[str]) -> list[Call] | None:
    text = body.strip().removeprefix(MISTRAL_START).strip()
    if text.startswith("["):
        ok = isinstance(_json(text), list)  # checked whole: then its items are read one by one
        return _calls(_values(text, 1, ",", close="]"), names) if ok else None
    if text.startswith("{"):
        return _calls(_values(text, 0, ""), names)
    calls: list[Call] = []
    for part in text.split(MISTRAL_START):  # name[ARGS]{...}, each after its own marker
        name, sep, args = part.partition(MISTRAL_ARGS)
        one = _call(Member(value={"name": name.strip()}, raw={ARGS_KEYS[0]: args.strip()}), names)
        if one is None or not sep:
            return None
        calls.append(one)
    return calls


class Member(msgspec.Struct, frozen=True, kw_only=True):
    """A JSON value read from the text; for an object, its arguments' text as written."""

    value: object
    raw: dict[str, str] = {}


ARGS_KEYS = ("arguments", "parameters")  # Llama's name for them
_WS = " \t\n\r"  # JSON's whitespace
_DECODER = json.JSONDecoder()


def _calls(values: list[Member] | None, names: frozenset[str]) -> list[Call] | None:
    if not values:
        return None
    calls = [_call(v, names) for v in values]
    return None if any(c is None for c in calls) else [c for c in calls if c is not None]


def _call(m: Member, names: frozenset[str]) -> Call | None:
    """{"name": declared, "arguments" (or Llama's "parameters"): an object (or its JSON)}: its
    arguments are the object's text as the model wrote it (as OpenAI's are)."""
    value = m.value
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    key = next((k for k in ARGS_KEYS if k in m.raw), None)
    text = "{}" if key is None else m.raw[key]
    args = _json(text)
    if isinstance(args, str):  # the arguments written as a JSON string of the object
        text = args.strip()
        args = _json(text)
    if not isinstance(args, dict):
        return None
    return Call(name=str(value["name"]), arguments=text)


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested past Python's stack
        return None


def _values(text: str, at: int, sep: str, close: str = "") -> list[Member] | None:
    """The JSON values in text from at, separated by whitespace or sep (Llama's ";"; a list's ","
    once json.loads has checked it), up to close (a list's "]") or the end; None if not that."""
    values: list[Member] = []
    try:
        while True:
            while at < len(text) and (text[at] in _WS or text[at] == sep):
                at += 1
            if close and text[at : at + 1] == close:
                return values
            if at == len(text):
                return None if close else values
            member, at = _member(text, at)
            values.append(member)
    except (ValueError, RecursionError):
        return None


def _member(text: str, at: int) -> tuple[Member, int]:
    """The value at text[at] and where it ends; an object member by member, to keep the text of
    its arguments (the last, as json.loads keeps the last of a repeated key)."""
    if text[at : at + 1] != "{":
        scalar, end = _DECODER.raw_decode(text, at)
        return Member(value=scalar), end
    value: dict[str, object] = {}
    raw: dict[str, str] = {}
    at = _skip(text, at + 1)
    while text[at : at + 1] != "}" or value:
        key, at = _DECODER.raw_decode(text, at)
        at = _skip(text, at)
        if not isinstance(key, str) or text[at : at + 1] != ":":
            raise ValueError("not a JSON object")
        start = _skip(text, at + 1)
        value[key], at = _DECODER.raw_decode(text, start)
        if key in ARGS_KEYS:
            raw[key] = text[start:at]
        at = _skip(text, at)
        if text[at : at + 1] == "}":
            break
        if text[at : at + 1] != ",":
            raise ValueError("not a JSON object")
        at = _skip(text, at + 1)
    return Member(value=value, raw=raw), at + 1


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WS:
        at += 1
    return at


class Head(msgspec.Struct, frozen=True, kw_only=True):
    """The start of a call object: its function's name, then where its arguments object begins."""

    name: str
    at: int


def call_head(text: str) -> Head | int | None:
    """text begins a call object: its Head once the name is read and an arguments object begins,
    the object's length when it is whole before that (its arguments first, or none), or None
    when more text is needed (or it is not a call: the caller reads it whole at the end)."""
    name: object = None
    at = _skip(text, 1)
    try:
        while at < len(text):
            if text[at] == "}":
                return at + 1
            key, at = _DECODER.raw_decode(text, at)
            at = _skip(text, at)
            if text[at : at + 1] != ":":
                return None
            at = _skip(text, at + 1)
            if key in ARGS_KEYS and isinstance(name, str) and text[at : at + 1] == "{":
                return Head(name=name, at=at)
            value, at = _DECODER.raw_decode(text, at)
            name = value if key == "name" else name
            at = _skip(text, at)
            if text[at : at + 1] == ",":
                at = _skip(text, at + 1)
    except (ValueError, RecursionError):
        return None
    return None


class Depth:
    """Where a JSON value that began at depth `depth` closes, read piece by piece."""

    def __init__(self, depth: int) -> None:
        self.depth, self.in_string, self.escaped = depth, False, False

    def close(self, text: str) -> int | None:
        """The length of text up to where the value closes, or None: not in text."""
        for i, ch in enumerate(text):
            if self.escaped:
                self.escaped = False
            elif self.in_string:
                self.escaped = ch == "\\"
                self.in_string = ch != '"'
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None
