"""Structured output: what a request constrains its text to, built and checked (llguidance
compiles it: engines/guides.py). Pure, no I/O.

The engine-independent API (what a request handler or the tool-calling code builds):

    Constraint(kind=..., text=...)  a frozen value, the compile caches' key
        kind "json_object"  any JSON object (text unused: "")
        kind "json_schema"  text: the schema's JSON; strict=True refuses keywords llguidance
                            cannot enforce (uniqueItems, if/then, ...), False ignores them
        kind "regex"        text: a Rust-regex the whole output matches
        kind "choice"       text: a JSON list of strings, the output is one of them
        kind "lark"         text: a Lark grammar in llguidance's dialect; `%json {schema}` embeds
                            a JSON Schema, e.g. a tool call:
                                start: "<tool_call>\\n" call "\\n</tool_call>"
                                call: %json {"type": "object", ...}
    json_object(), json_schema(schema, strict), regex(p), choice(options), lark(grammar),
    wrapped_json(before, schema, after)  build them (wrapped_json: the tool-call shape above)
    problem(c) -> str | None             why c cannot be served (the 400's message), cached
    requested(req) -> Constraint | Problem | None   a request's response_format, guided_* or
                                                    structured_outputs

Engines compile a Constraint into per-choice Guides with guides.Grammars (engines/guides.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import msgspec
from llguidance import LLMatcher

from services.worker.engines.guides import PARAM, dumps, grammar_text, limits, short

# Re-exported (the `as` form) for the callers that name them grammar.X: shaping, tools, bench.
from services.worker.engines.guides import Constraint as Constraint
from services.worker.engines.guides import Grammars as Grammars
from services.worker.engines.guides import hf_tokenizer as hf_tokenizer

MAX_TEXT = 64 * 1024  # bytes of schema, regex or grammar text a request may send
MAX_CHOICES = 1024


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """Why a request's constraint cannot be served: a 400 invalid_value naming param."""

    message: str
    param: str = PARAM


def json_object(param: str = PARAM) -> Constraint:
    return Constraint(kind="json_object", param=param)


def json_schema(schema: object, strict: bool = True, param: str = PARAM) -> Constraint:
    return Constraint(kind="json_schema", text=dumps(schema), strict=strict, param=param)


def regex(pattern: str, param: str = PARAM) -> Constraint:
    return Constraint(kind="regex", text=pattern, param=param)


def choice(options: Sequence[str], param: str = PARAM) -> Constraint:
    return Constraint(kind="choice", text=dumps(list(options)), param=param)


def lark(grammar: str, param: str = PARAM) -> Constraint:
    return Constraint(kind="lark", text=grammar, param=param)


def wrapped_json(before: str, schema: object, after: str, param: str = PARAM) -> Constraint:
    """Text `before`, then one JSON value of `schema`, then `after` (a tool call's shape)."""
    grammar = f"start: {dumps(before)} value {dumps(after)}\nvalue: %json {dumps(schema)}\n"
    return lark(grammar, param)


@lru_cache(maxsize=256)
def problem(c: Constraint) -> str | None:
    """Why c cannot be served (None: it can); bounded in size and in llguidance's work."""
    if len(c.text.encode()) > MAX_TEXT:
        return f"{c.param} is over {MAX_TEXT} bytes"
    try:
        grammar = grammar_text(c)
    except ValueError as exc:
        return f"{c.param}: {exc}"
    error = LLMatcher.validate_grammar(grammar, None, limits=limits())
    return f"{c.param}: {short(error)}" if error else None


# ---- reading a request ----


def requested(
    fields: Mapping[str, Any], whitespace: str | None = None
) -> Constraint | Problem | None:
    """The constraint a request's fields ask for: OpenAI's response_format, vLLM's guided_json,
    guided_regex, guided_choice, guided_grammar, or their successor structured_outputs (at most
    one of all these); checked. whitespace: vLLM's guided_whitespace_pattern, which shapes
    JSON output only (with no JSON kind asked for it is refused, not ignored)."""
    asked = [(k, v) for k, v in fields.items() if v is not None]
    if not asked:
        return None if whitespace is None else _json_only(WHITESPACE)
    if len(asked) > 1:
        names = ", ".join(k for k, _ in asked)
        message = f"ask for one output constraint, not several ({names})"
        return Problem(message=message, param=asked[1][0])
    param, value = asked[0]
    try:
        built = _build(param, value)
    except ValueError as exc:  # guided_json that is not JSON
        return Problem(message=f"{param}: {exc}", param=param)
    if built is None or isinstance(built, Problem):
        return built
    if whitespace is not None:
        if built.kind not in JSON_KINDS:
            return _json_only(WHITESPACE)
        if built.whitespace is not None:
            message = f"send one whitespace pattern, not {WHITESPACE} and {param}'s"
            return Problem(message=message, param=WHITESPACE)
        built, param = msgspec.structs.replace(built, whitespace=whitespace), WHITESPACE
    if built.whitespace is not None and len(built.whitespace.encode()) > MAX_WHITESPACE:
        return Problem(message=f"{param}: over {MAX_WHITESPACE} bytes", param=param)
    why = problem(built)
    return built if why is None else Problem(message=why, param=param)


JSON_KINDS = ("json_object", "json_schema")
WHITESPACE = "guided_whitespace_pattern"
MAX_WHITESPACE = 256  # bytes of a whitespace regex (llguidance's limits bound its work too)


def _json_only(param: str) -> Problem:
    message = (
        f"{param} shapes JSON output only: send it with guided_json, a JSON response_format "
        "or structured_outputs' json or json_object"
    )
    return Problem(message=message, param=param.split(".")[0])


def _build(param: str, value: Any) -> Constraint | Problem | None:
    if param == "response_format":
        return _response_format(value)
    if param == "structured_outputs":
        return _structured(value)
    return _guided(param.removeprefix("guided_"), value, param)


def _guided(kind: str, value: Any, param: str) -> Constraint | Problem:
    """vLLM's guided_<kind> (and structured_outputs' <kind>): json, regex, choice, grammar."""
    if kind == "json":
        schema = json.loads(value) if isinstance(value, str) else value
        return json_schema(schema, strict=False, param=param)
    if kind == "regex" and isinstance(value, str):
        return regex(value, param)
    if kind == "choice" and isinstance(value, list) and len(value) <= MAX_CHOICES:
        return choice(value, param)
    if kind == "grammar" and isinstance(value, str):
        return lark(value, param)
    return Problem(message=f"{param} has the wrong type or size", param=param)


STRUCTURED = ("json", "regex", "choice", "grammar", "json_object")
# Options that change nothing here: no other backend to fall back to, and JSON is compact
# (no whitespace but none) unless whitespace_pattern says otherwise.
STRUCTURED_NEUTRAL = ("disable_fallback", "disable_any_whitespace")
STRUCTURED_OPTIONS = (*STRUCTURED_NEUTRAL, "whitespace_pattern")


def _structured(value: Any) -> Constraint | Problem:
    """vLLM's structured_outputs (>= 0.10): exactly one of STRUCTURED, and its
    whitespace_pattern (as guided_whitespace_pattern); any other option it sets
    (structural_tag, disable_additional_properties) is refused."""
    param = "structured_outputs"
    if not isinstance(value, dict):
        return Problem(message=f"{param} must be an object", param=param)
    asked = {k: v for k, v in value.items() if v is not None and v is not False}
    other = [k for k in asked if k not in STRUCTURED and k not in STRUCTURED_OPTIONS]
    if other:
        return Problem(message=f"{param}.{other[0][:64]} is not supported here", param=param)
    kinds = [k for k in asked if k in STRUCTURED]
    if len(kinds) != 1:
        message = f"{param} asks for exactly one of {', '.join(STRUCTURED)}"
        return Problem(message=message, param=param)
    whitespace = asked.get("whitespace_pattern")
    if whitespace is not None and not isinstance(whitespace, str):
        return Problem(message=f"{param}.whitespace_pattern must be a string", param=param)
    whitespace = whitespace or None  # "": the default
    if whitespace is not None and kinds[0] not in ("json", "json_object"):
        return _json_only(f"{param}.whitespace_pattern")
    built = (
        json_object(param)
        if kinds[0] == "json_object"
        else _guided(kinds[0], asked[kinds[0]], param)
    )
    if isinstance(built, Problem) or whitespace is None or built.kind not in JSON_KINDS:
        return built
    return msgspec.structs.replace(built, whitespace=whitespace)


def _response_format(value: Any) -> Constraint | Problem | None:
    kind = value.get("type", "text") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind != "json_schema":
        return Problem(message="response_format.type must be text, json_object or json_schema")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        return Problem(message="response_format.json_schema needs a name and a schema")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        return Problem(message="response_format.json_schema.schema must be a JSON object")
    return json_schema(schema, strict=bool(spec.get("strict")))
