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
        one = _call(_json(body.strip()), names)
        return None if one is None else [one]
    if fmt == "llama3_json":
        return _calls(_json_seq(body.removeprefix(PYTHON_TAG)), names)
    return _mistral(body, names)


def _mistral(body: str, names: frozenset[str]) -> list[Call] | None:
    text = body.strip().removeprefix(MISTRAL_START).strip()
    if text.startswith(("[", "{")):
        value = _json(text)
        return _calls(value if isinstance(value, list) else [value], names)
    calls: list[Call] = []
    for part in text.split(MISTRAL_START):  # name[ARGS]{...}, each after its own marker
        name, sep, args = part.partition(MISTRAL_ARGS)
        value = {"name": name.strip(), "arguments": _json(args.strip())}
        one = _call(value, names) if sep else None
        if one is None:
            return None
        calls.append(one)
    return calls


def _calls(values: list[object] | None, names: frozenset[str]) -> list[Call] | None:
    if not values:
        return None
    calls = [_call(v, names) for v in values]
    return None if any(c is None for c in calls) else [c for c in calls if c is not None]


def _call(value: object, names: frozenset[str]) -> Call | None:
    """{"name": declared, "arguments" (or Llama's "parameters"): an object (or its JSON)}."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        args = _json(args)
    if not isinstance(args, dict):
        return None
    return Call(name=str(value["name"]), arguments=json.dumps(args, ensure_ascii=False))


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested past Python's stack
        return None


def _json_seq(text: str) -> list[object] | None:
    """JSON values one after another, separated by whitespace or ";" (Llama's parallel calls)."""
    decoder, at = json.JSONDecoder(), 0
    values: list[object] = []
    while True:
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            return None
        values.append(value)
