"""The llguidance adapter: a Constraint compiled to a grammar, and the per-choice Guide an engine
masks its logits with. Pure, no I/O.

One Grammars per tokenizer (byte_tokenizer(), json_tokenizer() or hf_tokenizer()):

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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from llguidance import LLMatcher, LLParserLimits, LLTokenizer, TokenizerWrapper

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

Kind = Literal["json_object", "json_schema", "regex", "choice", "lark"]
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
    """What a generation's text must match (its kinds: engines/grammar.py's docstring)."""

    kind: Kind
    text: str = ""
    strict: bool = True  # json_schema only: refuse what cannot be enforced (else ignore it)
    param: str = PARAM  # the request field that asked for it (named in a 400)
    # JSON kinds only: a regex the whitespace between JSON's tokens matches (vLLM's
    # guided_whitespace_pattern); None: no whitespace (JSON_OPTIONS)
    whitespace: str | None = None


def dumps(value: object) -> str:
    """value as compact JSON (how constraints write schemas, choices and literals)."""
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
        return LLMatcher.grammar_from_lark("start: " + " | ".join(dumps(o) for o in options))
    return LLMatcher.grammar_from_lark(c.text)


def short(message: str, limit: int = 500) -> str:
    """An llguidance message, cut (it may quote the grammar, which the client sent)."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit] + "..."


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
                raise GrammarError(short(matcher.get_error()))
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
