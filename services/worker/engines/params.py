"""What an engine can do and what one request asks of it, as values. Pure, no I/O."""

from __future__ import annotations

import msgspec

from services.worker.engines.guides import Constraint


class EngineLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_batch: int  # concurrent sequences the engine runs (the admission default max_in_flight)
    max_context: int  # prompt + completion tokens per sequence
    # Chat image parts (image_url) reach the engine; False: they are refused, never dropped.
    accepts_images: bool = False
    # Structured output (grammar.Constraint) can be enforced; False (an exllamav2 checkpoint
    # without tokenizer.json): response_format, guided_*, structured_outputs and a forced
    # tool_choice are refused up front (core.sampling), never failed at job creation.
    constrains_output: bool = True


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # vLLM's min_p: after top-k and top-p, only tokens of probability >= min_p x the likeliest's
    # are kept (0: off). Applied last, as exllamav2's sampler does (vLLM applies it before top-k
    # and top-p: the two differ only when top_p < 1 is sent too).
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # vLLM's: the stop string (or stop_token_ids token, or end token) that ended the job stays
    # in its text; skip_special_tokens False: special tokens' text is part of the answer.
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's: tokens that end the job ("stop") as the end token does (their text is not part
    # of the answer); before min_tokens are generated they, and the end token, cannot be
    # sampled; ignore_eos: the end token is an ordinary token (a grammar's end still ends).
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    # Penalties and logit bias: every engine applies engines/penalties.py.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's extension; 1.0 is off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids checked < vocab_size
    # None: no log probabilities (and no cost). k: every generated token's Chunk carries its
    # logprob and the k most likely tokens of its step (engines/logprobs.py says of what).
    logprobs: int | None = None
    # Structured output: the text must match it (grammar.py); the engine masks every step's
    # logits to the tokens it allows, and the job ends ("stop") when it is complete.
    constraint: Constraint | None = None
