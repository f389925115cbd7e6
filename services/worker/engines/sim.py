"""Simulator engine: deterministic text at configurable speed, for tests and fleet-scale benches.

A real Engine implementation (not a mock): it tokenizes, applies a chat template, enforces context
limits, honours stop strings, max_tokens, penalties and logit_bias (over VOCAB), vLLM's
min_p (in its logprobs), min_tokens, ignore_eos (its end token is eos_after) and
stop_token_ids, reports logprobs of its distribution (engines/logprobs.py) when asked, runs up to
max_batch sequences at once and slows down as the batch grows, so fleets of hundreds of workers
fit on one machine.

Prefill takes ttft_s + uncached prompt tokens / prefill_tokens_per_s. With prefix_cache_blocks > 0
the engine keeps a PrefixCache of the prompts it prefilled (schemas/prefix.py blocks, which the
worker computes from the request and hands to start()); the uncached tokens are then the prompt's
tokens x (1 - leading blocks held / its full blocks). An approximation: the sim counts tokens in
words and blocks are 256 bytes of canonical text, so it assumes words spread evenly over the bytes
(and the partial last block, never cached, counts as cached in that share; negligible for the long
prompts a cache is for).

Structured output (SamplingParams.constraint): the sim then speaks over GRAMMAR_TOKENS, its words
(" word", ids as in VOCAB) plus every single byte and an end token, so any grammar can be met;
llguidance masks the hashed logits to the tokens the grammar allows (guides.py), and the sim
picks the likeliest of those as always. logit_bias can still name only VOCAB's ids (vocab_size).
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import math
import re
from collections.abc import Awaitable, Callable, Sequence

import msgspec

from schemas.inference import ChatMessage
from services.worker.engines import guides, logprobs, penalties
from services.worker.engines.base import (
    CANCELLED,
    Chunk,
    EngineError,
    EngineLimits,
    Job,
    PrefixUse,
    SamplingParams,
)
from services.worker.engines.logprobs import StepLogprobs
from services.worker.engines.stops import StopScanner
from services.worker.engines.template import DEFAULT_OPTIONS, ChatOptions
from services.worker.prefix_cache import PrefixCache

# One token per run of non-space. Not \s*\S+ (same count): on a long run of whitespace it
# retries from every position, quadratic, and a 100 KB all-space prompt stalled the worker.
_TOKEN = re.compile(r"\S+")
_WORDS = tuple(
    [
        "the",
        "fleet",
        "routes",
        "each",
        "request",
        "to",
        "the",
        "least",
        "busy",
        "worker",
        "and",
        "refuses",
        "honestly",
        "when",
        "full",
        "capacity",
        "follows",
        "the",
        "registry",
        "while",
        "heartbeats",
        "carry",
        "load",
        "so",
        "backpressure",
        "reaches",
        "clients",
    ]
)
# The sim's vocabulary: token id i is the word VOCAB[i].
VOCAB = tuple(dict.fromkeys(_WORDS))
_IDS = {word: i for i, word in enumerate(VOCAB)}
# What the sim speaks under a grammar: its words, then byte b as token len(VOCAB) + b, then END.
GRAMMAR_TOKENS: tuple[bytes, ...] = (
    *((" " + w).encode() for w in VOCAB),
    *(bytes([b]) for b in range(256)),
    b"<|end|>",
)
END = len(GRAMMAR_TOKENS) - 1


class SimSettings(msgspec.Struct, frozen=True, kw_only=True):
    ttft_s: float = 0.02  # time to first token (prefill)
    tokens_per_s: float = 200.0  # per sequence, alone in the batch
    max_batch: int = 8
    max_context: int = 4096
    slowdown_per_seq: float = 0.05  # each extra running sequence slows every step by 5 %
    eos_after: int | None = None  # stop on "eos" after this many tokens (None: only max_tokens)
    prefill_tokens_per_s: float = 0.0  # uncached prompt tokens per second; 0: only ttft_s
    prefix_cache_blocks: int = 0  # the prefix cache's capacity in blocks; 0: no cache


def describe(token: int, first: bool) -> tuple[str, bytes]:
    """A sim token's text (words after the first follow a space) and its bytes."""
    text = VOCAB[token] if first else " " + VOCAB[token]
    return text, text.encode()


def describe_grammar(token: int) -> tuple[str, bytes]:
    """A token's text and bytes when the sim speaks under a grammar (no first-word rule)."""
    raw = GRAMMAR_TOKENS[token]
    return raw.decode("utf-8", "replace"), raw


def _piece(
    token: int, first: bool, guide: guides.Guide | None, utf8: codecs.IncrementalDecoder
) -> str:
    """The text a token adds: a word, or under a grammar its bytes (a character may span
    tokens: the decoder holds its first bytes)."""
    return describe(token, first)[0] if guide is None else utf8.decode(GRAMMAR_TOKENS[token])


def prefix_use(prompt_tokens: int, blocks: int, hits: int) -> PrefixUse:
    """The share of the prompt a cache holding `hits` of its `blocks` leading blocks spares."""
    cached = prompt_tokens * hits // blocks if blocks else 0
    return PrefixUse(blocks=blocks, hits=hits, cached_tokens=cached)


def prefill_s(settings: SimSettings, prompt_tokens: int, cached_tokens: int = 0) -> float:
    """Time to the first token: the fixed ttft_s plus the tokens not cached at the prefill rate."""
    if settings.prefill_tokens_per_s <= 0:
        return settings.ttft_s
    return settings.ttft_s + (prompt_tokens - cached_tokens) / settings.prefill_tokens_per_s


class SimEngine:
    def __init__(
        self,
        model_id: str,
        settings: SimSettings | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """sleep: how the sim waits out prefill and each step (tests record the delays)."""
        self.model_id = model_id
        self.sleep = sleep
        self.settings = settings or SimSettings()
        self.limits = EngineLimits(
            max_batch=self.settings.max_batch, max_context=self.settings.max_context
        )
        self.vocab_size = len(VOCAB)
        self.running = 0
        self.peak_running = 0
        blocks = self.settings.prefix_cache_blocks
        self.prefix_cache = PrefixCache(blocks) if blocks > 0 else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._grammars: guides.Grammars | None = None  # built at the first constrained job

    async def load(self) -> None:
        return None

    def count_tokens(self, text: str) -> int:
        return len(_TOKEN.findall(text))

    def chat_prompt(
        self, messages: Sequence[ChatMessage], options: ChatOptions = DEFAULT_OPTIONS
    ) -> str:
        """Its own format, one `<|role|> text` line a message; it has no template, so
        options.variables change nothing (with tools in play the demo template renders)."""
        lines = [f"<|{m.role}|> {m.text()}" for m in messages]
        opened = options.add_generation_prompt and not options.continue_final_message
        return "\n".join([*lines, "<|assistant|>"] if opened else lines)

    def start(
        self, prompt: str, params: SamplingParams, prefix_blocks: tuple[int, ...] = ()
    ) -> Job:
        job = Job(prompt_tokens=self.count_tokens(prompt))
        guide = None
        if params.constraint is not None:
            try:
                guide = self._guide(params.constraint)
            except guides.GrammarError as exc:
                job.push(EngineError(f"the constraint does not compile: {exc}"))
                return job
        task = asyncio.create_task(self._run(job, prompt, params, prefix_blocks, guide))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def _guide(self, constraint: guides.Constraint) -> guides.Guide:
        if self._grammars is None:
            self._grammars = guides.Grammars(guides.byte_tokenizer(GRAMMAR_TOKENS, END))
        return self._grammars.guide(constraint)

    def _token(
        self,
        prompt: str,
        params: SamplingParams,
        context: list[int],
        completion: list[int],
        guide: guides.Guide | None = None,
    ) -> tuple[int, StepLogprobs | None]:
        """Greedy over logits in [0, 1) hashed from (seed, prompt, position), after the
        penalties and bias (so the request's knobs act on the sim as on a model) and the
        grammar's mask; with its logprobs when asked: of logprobs.distribution over those
        logits, whose most likely token is the one the sim picks (so it is a sample any sampler
        could draw)."""
        key = f"{params.seed}|{prompt}|{len(completion)}".encode()
        if guide is None:
            digest = hashlib.blake2b(key, digest_size=len(VOCAB)).digest()
        else:
            digest = hashlib.shake_128(key).digest(len(GRAMMAR_TOKENS))
        logits = [b / 256 for b in digest]
        if penalties.active(params):
            logits = penalties.apply(logits, context, completion, params)
        if len(completion) < params.min_tokens:  # its stop tokens cannot come yet
            logits = [-math.inf if t in params.stop_token_ids else x for t, x in enumerate(logits)]
        if guide is not None:
            logits = guides.mask_list(logits, guide.allowed())
        token = max(range(len(logits)), key=logits.__getitem__)  # the first of equals
        if params.logprobs is None:
            return token, None
        dist = logprobs.distribution(
            logits, params.temperature, params.top_k, params.top_p, params.min_p
        )
        first = not completion
        name = describe_grammar if guide is not None else lambda t: describe(t, first)
        return token, logprobs.step(dist, token, params.logprobs, name)

    async def _prefill(self, job: Job, blocks: tuple[int, ...]) -> None:
        """Wait out the prefill of what the cache does not hold; then the cache holds it all."""
        cache = self.prefix_cache
        if cache is not None:
            job.prefix = prefix_use(job.prompt_tokens, len(blocks), cache.lookup(blocks))
        cached = 0 if job.prefix is None else job.prefix.cached_tokens
        await self.sleep(prefill_s(self.settings, job.prompt_tokens, cached))
        if cache is not None and not job.cancelled:
            cache.insert(blocks)

    async def _run(
        self,
        job: Job,
        prompt: str,
        params: SamplingParams,
        blocks: tuple[int, ...],
        guide: guides.Guide | None = None,
    ) -> None:
        s = self.settings
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            await self._prefill(job, blocks)
            scanner = StopScanner(params.stop, params.include_stop_str_in_output)
            context = [_IDS[w] for w in _TOKEN.findall(prompt) if w in _IDS]
            completion: list[int] = []
            utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # byte tokens may split one
            for i in range(params.max_tokens):
                if job.cancelled:
                    job.push(CANCELLED)
                    return
                token, step = self._token(prompt, params, context, completion, guide)
                # the grammar allowed the end and it chose it, or a stop token: its text is no
                # part of the answer, unless include_stop_str_in_output keeps a stop token's
                kept = params.include_stop_str_in_output and token in params.stop_token_ids
                if (guide is not None and token == END) or token in params.stop_token_ids:
                    said = _piece(token, i == 0, guide, utf8) if kept else ""
                    text = scanner.feed(said + utf8.decode(b"", final=True)) + scanner.flush()
                    job.push(Chunk(text=text, tokens=1, finish_reason="stop"))
                    return
                if guide is not None and not guide.advance(token):
                    job.push(EngineError(f"the grammar refused a token it allowed: {guide.error}"))
                    return
                completion.append(token)
                lp = () if step is None else (step,)
                out = scanner.feed(_piece(token, i == 0, guide, utf8))
                if scanner.stopped:
                    job.push(Chunk(text=out, tokens=1, finish_reason="stop", logprobs=lp))
                    return
                complete = guide is not None and guide.done  # nothing may follow: it ends here
                eos = complete or self._eos(params, i + 1)
                last = i + 1 == params.max_tokens
                reason = "stop" if eos else "length" if last else None
                if reason:
                    text = out + scanner.feed(utf8.decode(b"", final=True)) + scanner.flush()
                    job.push(Chunk(text=text, tokens=1, finish_reason=reason, logprobs=lp))
                    return
                job.push(Chunk(text=out, tokens=1, logprobs=lp))
                delay = (1.0 / s.tokens_per_s) * (1.0 + s.slowdown_per_seq * (self.running - 1))
                await self.sleep(delay)
        finally:
            self.running -= 1

    def _eos(self, params: SamplingParams, generated: int) -> bool:
        """Whether the sim speaks its end token (eos_after) after `generated` tokens."""
        after = self.settings.eos_after
        if after is None or params.ignore_eos:
            return False
        return generated >= max(after, params.min_tokens)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
