"""Structured output: what a request constrains its text to, checked and compiled by llguidance,
and the per-choice Guide an engine masks its logits with. Pure, no I/O.

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

and on the engine side, one Grammars per tokenizer (sim_tokenizer() or hf_tokenizer()):

    grammars.guide(c) -> Guide          a fresh matcher per choice (n > 1: one each), from a
                                        bounded LRU of compiled matchers keyed by the Constraint
    guide.allowed() -> bytes            one byte per tokenizer token, non-zero where allowed
    guide.advance(token) -> bool        consume the sampled token (False: the grammar refused)
    guide.done                          the grammar is complete: the job ends ("stop")
    guide.eos                           the tokenizer's end token (allowed once accepting)

Engines apply the mask to the logits the sampler draws from, after penalties and logit_bias,
before temperature, top-k and top-p (docs/engines.md, "Structured output").
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from llguidance import LLMatcher, LLParserLimits, LLTokenizer, TokenizerWrapper

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

Kind = Literal["json_object", "json_schema", "regex", "choice", "lark"]
MAX_TEXT = 64 * 1024  # bytes of schema, regex or grammar text a request may send
MAX_CHOICES = 1024
PARAM = "response_format"
# Tighter than llguidance's defaults, so that a hostile schema fails fast instead of compiling
# for long: lexer fuel is about 50k/ms to build and 14k/ms per step (llguidance's numbers), so
# building stays under ~10 ms and one token's mask under ~7 ms of lexer work, whatever is sent.
LIMITS = dict(
    initial_lexer_fuel=500_000,
    step_lexer_fuel=100_000,
    step_max_items=50_000,
    max_lexer_states=50_000,
    max_grammar_size=100_000,
    verbose_errors=False,
)
# Compact JSON: no whitespace but none, so a model cannot pad its answer with spaces forever.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


def limits() -> LLParserLimits:
    return LLParserLimits(**LIMITS)  # type: ignore[arg-type]


class Constraint(msgspec.Struct, frozen=True, kw_only=True):
    """What a generation's text must match (see the module docstring)."""

    kind: Kind
    text: str = ""
    strict: bool = True  # json_schema only: refuse what cannot be enforced (else ignore it)
    param: str = PARAM  # the request field that asked for it (named in a 400)
    # JSON kinds only: a regex the whitespace between JSON's tokens matches (vLLM's
    # guided_whitespace_pattern); None: no whitespace (JSON_OPTIONS)
    whitespace: str | None = None


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """Why a request's constraint cannot be served: a 400 invalid_value naming param."""

    message: str
    param: str = PARAM


def json_object(param: str = PARAM) -> Constraint:
    return Constraint(kind="json_object", param=param)


def json_schema(schema: object, strict: bool = True, param: str = PARAM) -> Constraint:
    return Constraint(kind="json_schema", text=_dumps(schema), strict=strict, param=param)


def regex(pattern: str, param: str = PARAM) -> Constraint:
    return Constraint(kind="regex", text=pattern, param=param)


def choice(options: Sequence[str], param: str = PARAM) -> Constraint:
    return Constraint(kind="choice", text=_dumps(list(options)), param=param)


def lark(grammar: str, param: str = PARAM) -> Constraint:
    return Constraint(kind="lark", text=grammar, param=param)


def wrapped_json(before: str, schema: object, after: str, param: str = PARAM) -> Constraint:
    """Text `before`, then one JSON value of `schema`, then `after` (a tool call's shape)."""
    grammar = f"start: {_dumps(before)} value {_dumps(after)}\nvalue: %json {_dumps(schema)}\n"
    return lark(grammar, param)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def grammar_text(c: Constraint) -> str:
    """c as the grammar llguidance takes; ValueError when c's text is not what its kind needs."""
    options: JsonCompileOptions = {**JSON_OPTIONS}
    if c.whitespace is not None:
        options["whitespace_pattern"] = c.whitespace
    if c.kind == "json_object":
        return LLMatcher.grammar_from_json_schema('{"type":"object"}', overrides=options)
    if c.kind == "json_schema":
        options["lenient"] = not c.strict
        return LLMatcher.grammar_from_json_schema(c.text, overrides=options)
    if c.kind == "regex":
        return LLMatcher.grammar_from_regex(c.text)
    if c.kind == "choice":
        options = json.loads(c.text)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ValueError("the choices must be a non-empty list of non-empty strings")
        return LLMatcher.grammar_from_lark("start: " + " | ".join(_dumps(o) for o in options))
    return LLMatcher.grammar_from_lark(c.text)


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
    return f"{c.param}: {_short(error)}" if error else None


def _short(message: str, limit: int = 500) -> str:
    """An llguidance message, cut (it may quote the grammar, which the client sent)."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit] + "..."


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


# ---- the engine side ----


class GrammarError(Exception):
    """A constraint that passed problem() yet failed against a tokenizer."""


class Guide:
    """One choice's grammar state: which tokens may come next, and whether it is complete."""

    def __init__(self, matcher: LLMatcher, eos: int) -> None:
        self._matcher = matcher
        self.eos = eos

    def allowed(self) -> bytes:
        """One byte per tokenizer token: non-zero where the token may come next."""
        return self._matcher.compute_logit_bias()

    def advance(self, token: int) -> bool:
        """Consume the sampled token; False if the grammar refused it (the job must end)."""
        return self._matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """No more text can follow (only the end token could): the generation is complete."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


def mask_list(logits: list[float], allowed: bytes) -> list[float]:
    """Logits (index = token id) with the tokens the grammar forbids at -inf."""
    width = len(allowed)
    return [x if i < width and allowed[i] else -float("inf") for i, x in enumerate(logits)]


class Grammars:
    """One tokenizer's compiled constraints: a bounded LRU of matchers, copied per choice."""

    def __init__(self, tokenizer: LLTokenizer, capacity: int = 64) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity
        self._compiled: OrderedDict[Constraint, LLMatcher] = OrderedDict()

    def guide(self, c: Constraint) -> Guide:
        """A fresh grammar state for one choice; GrammarError if c fails on this tokenizer."""
        matcher = self._compiled.get(c)
        if matcher is None:
            matcher = LLMatcher(self.tokenizer, grammar_text(c), log_level=0, limits=limits())
            if matcher.is_error():
                raise GrammarError(_short(matcher.get_error()))
            self._compiled[c] = matcher
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(c)
        return Guide(matcher.deep_copy(), self.tokenizer.eos_token)

    def __len__(self) -> int:
        return len(self._compiled)


class _Tokens:
    """What llguidance's TokenizerWrapper reads: each token's bytes, the end token, an encoder."""

    def __init__(self, tokens: Sequence[bytes], eos: int, encode: Callable[[bytes], list[int]]):
        self.tokens = list(tokens)
        self.eos_token_id = eos
        self.bos_token_id = None
        self.special_token_ids = [eos]
        self._encode = encode

    def __call__(self, text: bytes) -> list[int]:
        return self._encode(text)


def byte_tokenizer(tokens: Sequence[bytes], eos: int) -> LLTokenizer:
    """An llguidance tokenizer over the given tokens' bytes, which must hold every single byte
    (text is encoded byte by byte: llguidance needs any text to be encodable)."""
    single = {t[0]: i for i, t in enumerate(tokens) if len(t) == 1 and i != eos}
    if len(single) < 256:
        raise ValueError("a byte tokenizer needs a token for every byte")
    wrapper = TokenizerWrapper(_Tokens(tokens, eos, lambda text: [single[b] for b in text]))
    return LLTokenizer(wrapper)


def json_tokenizer(tokenizer_json: str, n_vocab: int, eos: int) -> LLTokenizer:
    """An llguidance tokenizer from a checkpoint's tokenizer.json text (exllamav2 checkpoints)."""
    return LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=eos)


def hf_tokenizer(tokenizer: Any, eos: Sequence[int] | None = None) -> LLTokenizer:
    """An llguidance tokenizer from a fast Hugging Face tokenizer (about 1 s for 128k tokens);
    eos: the model's end tokens, if not only the tokenizer's."""
    from llguidance.hf import from_tokenizer

    return from_tokenizer(tokenizer, eos_token=list(eos) if eos else None)
