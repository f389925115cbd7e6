"""Simulator engine: deterministic text at configurable speed, for tests and fleet-scale benches.

A real Engine implementation (not a mock): it tokenizes, applies a chat template, enforces context
limits, honours stop strings, max_tokens, penalties and logit_bias (over VOCAB), runs up to
max_batch sequences at once and slows down as the batch grows, so fleets of hundreds of workers
fit on one machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Sequence

import msgspec

from schemas.inference import ChatMessage
from services.worker.engines import penalties
from services.worker.engines.base import CANCELLED, Chunk, EngineLimits, Job, SamplingParams
from services.worker.engines.stops import StopScanner

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


class SimSettings(msgspec.Struct, frozen=True, kw_only=True):
    ttft_s: float = 0.02  # time to first token (prefill)
    tokens_per_s: float = 200.0  # per sequence, alone in the batch
    max_batch: int = 8
    max_context: int = 4096
    slowdown_per_seq: float = 0.05  # each extra running sequence slows every step by 5 %
    eos_after: int | None = None  # stop on "eos" after this many tokens (None: only max_tokens)


class SimEngine:
    def __init__(self, model_id: str, settings: SimSettings | None = None) -> None:
        self.model_id = model_id
        self.settings = settings or SimSettings()
        self.limits = EngineLimits(
            max_batch=self.settings.max_batch, max_context=self.settings.max_context
        )
        self.vocab_size = len(VOCAB)
        self.running = 0
        self.peak_running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(self) -> None:
        return None

    def count_tokens(self, text: str) -> int:
        return len(_TOKEN.findall(text))

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        lines = [f"<|{m.role}|> {m.text()}" for m in messages]
        return "\n".join([*lines, "<|assistant|>"])

    def start(self, prompt: str, params: SamplingParams) -> Job:
        job = Job(prompt_tokens=self.count_tokens(prompt))
        task = asyncio.create_task(self._run(job, prompt, params))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def _token(
        self, prompt: str, params: SamplingParams, context: list[int], completion: list[int]
    ) -> int:
        """Greedy over logits in [0, 1) hashed from (seed, prompt, position), after the
        penalties and bias (so the request's knobs act on the sim as on a model)."""
        key = f"{params.seed}|{prompt}|{len(completion)}".encode()
        digest = hashlib.blake2b(key, digest_size=len(VOCAB)).digest()
        logits = [b / 256 for b in digest]
        if penalties.active(params):
            logits = penalties.apply(logits, context, completion, params)
        return max(range(len(VOCAB)), key=logits.__getitem__)  # the first of equals

    async def _run(self, job: Job, prompt: str, params: SamplingParams) -> None:
        s = self.settings
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            await asyncio.sleep(s.ttft_s)
            scanner = StopScanner(params.stop)
            context = [_IDS[w] for w in _TOKEN.findall(prompt) if w in _IDS]
            completion: list[int] = []
            for i in range(params.max_tokens):
                if job.cancelled:
                    job.push(CANCELLED)
                    return
                completion.append(self._token(prompt, params, context, completion))
                out = scanner.feed((" " if i else "") + VOCAB[completion[-1]])
                if scanner.stopped:
                    job.push(Chunk(text=out, tokens=1, finish_reason="stop"))
                    return
                eos = s.eos_after is not None and i + 1 >= s.eos_after
                last = i + 1 == params.max_tokens
                reason = "stop" if eos else "length" if last else None
                if reason:
                    job.push(Chunk(text=out + scanner.flush(), tokens=1, finish_reason=reason))
                    return
                job.push(Chunk(text=out, tokens=1))
                step = (1.0 / s.tokens_per_s) * (1.0 + s.slowdown_per_seq * (self.running - 1))
                await asyncio.sleep(step)
        finally:
            self.running -= 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
