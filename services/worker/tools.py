"""A chat request's tools, as values: the declared functions, what tool_choice asks, the format
the model calls them in; why a request cannot have them here. Pure.

OpenAI's rules: tool_choice "none" (the model is told of no tools, and nothing is read as a
call), "auto" (the default with tools: the model may call), "required" (it must call one or
more), or {"type": "function", "function": {"name": ...}} (it must call that one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec

from schemas.inference import ChatCompletionRequest
from services.common.errors import ApiError, invalid
from services.worker.engines import grammar
from services.worker.engines.params import SamplingParams
from services.worker.tool_formats import HERMES_END, HERMES_START, ToolFormat
from services.worker.tool_stream import ToolStream

MAX_TOOLS = 128  # OpenAI's limit
MAX_FORCED_CALLS = 8  # "required" with parallel calls: at most this many in one reply
FunctionName = Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
Choice = Literal["auto", "required", "named"]


class FunctionDef(msgspec.Struct, frozen=True, kw_only=True):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: the function takes none
    strict: bool | None = None


class ToolDef(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(msgspec.Struct, frozen=True, kw_only=True):
    name: str


class NamedChoice(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["function"]
    function: NamedFunction


class ModelTools(msgspec.Struct, frozen=True, kw_only=True):
    """What a model can do with tools: whether its chat template tells it of them, and the
    format it calls them in (None: none this worker reads)."""

    renders: bool
    format: ToolFormat | None


class ToolPlan(msgspec.Struct, frozen=True, kw_only=True):
    """A request's tools in play (tool_choice not "none")."""

    tools: tuple[dict[str, Any], ...]  # as the client sent them: what the template renders
    functions: tuple[FunctionDef, ...]
    format: ToolFormat
    choice: Choice
    named: str | None = None  # choice "named": the function it must call
    parallel: bool = True

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.functions)

    def stream(self, new_id: Callable[[], str]) -> ToolStream:
        """A fresh reader of one choice's text: live (arguments streamed as they come) when the
        grammar forces the reply to be calls (constraint()), never for "auto"."""
        live = self.choice != "auto"
        return ToolStream(self.format, self.names, new_id, parallel=self.parallel, live=live)


def plan(
    req: ChatCompletionRequest, model: ModelTools, model_name: str
) -> ToolPlan | ApiError | None:
    """The request's tools (None: none in play), or why it cannot have them here."""
    functions = _functions(req.tools)
    if isinstance(functions, ApiError):
        return functions
    choice = _choice(req.tool_choice, {f.name for f in functions})
    if isinstance(choice, ApiError) or choice is None:
        return choice
    kind, named = choice
    if not model.renders or model.format is None:
        why = (
            "its chat template does not tell the model of tools"
            if not model.renders
            else "it calls tools in a format this worker does not read (it reads hermes, "
            "llama3_json and mistral)"
        )
        return invalid(
            f'model {model_name!r} cannot take tools here: {why}; send tool_choice "none" or '
            "no tools",
            code="unsupported_parameter",
            param="tools",
        )
    return ToolPlan(
        tools=tuple(req.tools or ()),
        functions=tuple(functions),
        format=model.format,
        choice=kind,
        named=named,
        parallel=req.parallel_tool_calls is not False,
    )


def _functions(tools: list[Any] | None) -> list[FunctionDef] | ApiError:
    if not tools:
        return []
    if len(tools) > MAX_TOOLS:
        return invalid(f"at most {MAX_TOOLS} tools, not {len(tools)}", param="tools")
    functions: list[FunctionDef] = []
    for i, tool in enumerate(tools):
        try:
            functions.append(msgspec.convert(tool, ToolDef).function)
        except msgspec.ValidationError as exc:
            return invalid(f"tools[{i}] is not a function tool: {exc}", param=f"tools[{i}]")
        if functions[-1].name in {f.name for f in functions[:-1]}:
            return invalid(
                f"tools[{i}]: function {functions[-1].name!r} is declared twice",
                param=f"tools[{i}]",
            )
    return functions


def _choice(value: object, names: set[str]) -> tuple[Choice, str | None] | ApiError | None:
    """What tool_choice asks: None when no tools are in play."""
    if value is None:
        value = "auto" if names else "none"
    if value == "none":
        return None
    if value in ("auto", "required"):
        if not names:
            if value == "auto":
                return None
            return invalid('tool_choice "required" needs tools', param="tool_choice")
        return ("auto" if value == "auto" else "required"), None
    try:
        name = msgspec.convert(value, NamedChoice).function.name
    except msgspec.ValidationError:
        return invalid(
            'tool_choice is "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in names:
        message = f"tool_choice names {name!r}, which is not among the tools"
        return invalid(message, param="tool_choice")
    return "named", name


def forces(req: ChatCompletionRequest) -> bool:
    """Whether tool_choice forces a call ("required" or a named function): a grammar
    (constraint()), which a model that cannot constrain its output must refuse up front."""
    return bool(req.tools) and req.tool_choice not in (None, "none", "auto")


def finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's "tool_calls" when the reply ended by calling; a cut-off reply stays "length"."""
    return "tool_calls" if called and reason == "stop" else reason


def in_history(req: ChatCompletionRequest) -> bool:
    """Whether the messages carry calls or their results (only a chat template writes them)."""
    return any(m.tool_calls or m.role == "tool" for m in req.messages)


def constraint(p: ToolPlan) -> grammar.Constraint | None:
    """For "required" or a named function: the grammar that makes the reply a valid call in the
    model's own format (one, or with parallel calls up to MAX_FORCED_CALLS), each of a declared
    function with arguments of its schema. None for "auto"."""
    if p.choice == "auto":
        return None
    chosen = [f for f in p.functions if p.choice == "required" or f.name == p.named]
    key = "parameters" if p.format == "llama3_json" else "arguments"
    # compact JSON: a model cannot pad its call with whitespace until max_tokens
    schema = {
        "x-guidance": {"whitespace_flexible": False},
        "anyOf": [_call_schema(f, key) for f in chosen],
    }
    many = p.parallel and p.choice == "required"
    more = f"{{0,{MAX_FORCED_CALLS - 1}}}"  # the calls after the first
    if p.format == "hermes":
        call = f'"{HERMES_START}\\n" body "\\n{HERMES_END}"'
        start = f'call ("\\n" call){more}' if many else "call"
    elif p.format == "llama3_json":
        call, start = "body", f'call ("; " call){more}' if many else "call"
    else:  # mistral, its [TOOL_CALLS] token left out (engines drop special tokens from text)
        call, start = "body", f'"[" call (", " call){more} "]"' if many else '"[" call "]"'
    body = json.dumps(schema, ensure_ascii=False)
    text = f"start: {start}\ncall: {call}\nbody: %json {body}\n"
    return grammar.lark(text, param="tool_choice")


def _call_schema(f: FunctionDef, key: str) -> dict[str, Any]:
    parameters = f.parameters if f.parameters is not None else {"type": "object", "properties": {}}
    if "properties" in parameters and "additionalProperties" not in parameters:
        # a forced call names the arguments declared, not ones the model makes up
        parameters = {**parameters, "additionalProperties": False}
    return {
        "type": "object",
        "properties": {"name": {"const": f.name}, key: parameters},
        "required": ["name", key],
        "additionalProperties": False,
    }


def constrained(params: SamplingParams, p: ToolPlan) -> SamplingParams | ApiError:
    """params with the grammar tool_choice asks for (unchanged for "auto"), or why not."""
    c = constraint(p)
    if c is None:
        return params
    if params.constraint is not None:
        return invalid(
            f"tool_choice {p.choice!r} cannot be combined with {params.constraint.param}: "
            "the reply is either the calls or that output",
            param="tool_choice",
        )
    why = grammar.problem(c)
    if why is not None:
        return invalid(why, param="tool_choice")
    return msgspec.structs.replace(params, constraint=c)
