"""The engine interface every backend implements (sim, transformers, exllamav2), and its Job.

Shaped after exllamav2's dynamic generator: a request becomes a job that is enqueued, produces
token chunks incrementally (from the engine's own thread or task), and can be cancelled at any
time. Engines push chunks with Job.push(), which is safe to call from any thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

import msgspec

from schemas.inference import ChatMessage
from services.worker.engines.logprobs import StepLogprobs

# The pure values live apart so the worker's core can shape requests without importing asyncio.
from services.worker.engines.params import EngineLimits as EngineLimits
from services.worker.engines.params import SamplingParams as SamplingParams
from services.worker.engines.template import DEFAULT_OPTIONS, ChatOptions
from services.worker.prefix_cache import PrefixCache


class Chunk(msgspec.Struct, frozen=True, kw_only=True):
    """Text produced by one engine step; finish_reason set on the last chunk of a job."""

    text: str
    tokens: int
    finish_reason: str | None = None  # "stop" (eos or stop string) | "length" | "cancelled"
    # When the job asked for them (SamplingParams.logprobs): one entry per token this chunk
    # counts, in order, but the end-of-sequence token has none (nor, on exllamav2, the tokens
    # still held back for a possible stop string when that token ends the job).
    logprobs: tuple[StepLogprobs, ...] = ()


CANCELLED = Chunk(text="", tokens=0, finish_reason="cancelled")  # a cancelled job's last chunk


class EngineError(Exception):
    """The engine failed a job (not the client's fault)."""

    @classmethod
    def of(cls, exc: BaseException) -> EngineError:
        """The error a job fails with when the engine's library raised exc."""
        return cls(f"{type(exc).__name__}: {exc}")


class PrefixUse(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine's prefix cache held of one job's prompt when its prefill began."""

    blocks: int  # the prompt's full blocks, looked up
    hits: int  # leading blocks the cache held
    cached_tokens: int  # prompt tokens not prefilled again (their KV was held)


class Job:
    """One generation in flight. Iterate it for chunks; cancel() stops it and frees its slot."""

    def __init__(self, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.prefix: PrefixUse | None = None  # set before the first chunk by a prefix cache
        self.cancelled = False
        self.finished = False
        self._loop = loop or asyncio.get_running_loop()
        self._queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()

    def push(self, chunk: Chunk | BaseException) -> None:
        """Thread-safe: hand a chunk (or the engine's error) to the consumer."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)

    def cancel(self) -> None:
        """Idempotent; the engine sees `cancelled` at its next step and drops the job."""
        self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.completion_tokens += item.tokens
            yield item
            if item.finish_reason is not None:
                self.finished = True
                return


class Engine(Protocol):
    """What the worker needs from a model backend."""

    model_id: str
    limits: EngineLimits
    vocab_size: int  # token ids are 0..vocab_size-1 (logit_bias keys are checked against it)

    async def load(self) -> None:
        """Load weights (off the event loop); raise a clear error if impossible."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def chat_prompt(
        self, messages: Sequence[ChatMessage], options: ChatOptions = DEFAULT_OPTIONS
    ) -> str:
        """Apply the model's chat template, ending where the assistant's reply begins (or as
        options say: vLLM's add_generation_prompt, continue_final_message,
        chat_template_kwargs); template.TemplateFailed when the request's cannot be rendered."""
        ...

    def start(self, prompt: str, params: SamplingParams) -> Job:
        """Enqueue a generation; returns at once. Must be called on the event loop."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class PrefixCaching(Protocol):
    """An engine that may reuse earlier prompts' KV (only the sim: docs/engines.md says why).

    prefix_cache None: not this time (configured off). start() takes the prompt's blocks
    (schemas/prefix.py); the engine looks them up when the prefill begins, sets Job.prefix, and
    inserts them once prefilled."""

    prefix_cache: PrefixCache | None

    def start(
        self, prompt: str, params: SamplingParams, prefix_blocks: tuple[int, ...] = ()
    ) -> Job: ...
