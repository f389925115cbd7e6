"""Log probabilities as pure math and values: which distribution they are of, and what an engine
reports per generated token. Pure, no I/O.

The distribution (docs/worker.md, "Log probabilities"), the one the sampler draws from: the step's
logits after penalties and logit_bias (penalties.py); at temperature T > 0 divided by T, then
top-k, top-p and min-p keep their tokens (the rest get -inf) and the kept ones renormalize. Greedy
(temperature 0) draws from nothing, so it reports the processed logits at temperature 1,
untruncated. Both are vLLM's `--logprobs-mode processed_logprobs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import msgspec

FLOOR = -9999.0  # how -inf is reported (JSON has no infinity; OpenAI and vLLM report this)
MAX_TOP = 20  # the most alternatives a request may ask for (OpenAI's top_logprobs limit)

# token id -> (its text, its bytes): how an engine names a token it reports
Describe = Callable[[int], tuple[str, bytes]]


class TokenLogprob(msgspec.Struct, frozen=True, kw_only=True):
    """A token, its bytes (its text may be part of a UTF-8 character) and its logprob."""

    token: str
    utf8: bytes
    logprob: float  # may be -inf: outside top-k / top-p (reported as FLOOR)


class StepLogprobs(msgspec.Struct, frozen=True, kw_only=True):
    """One generated token's logprob and the `top` most likely tokens of its step, best first."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...] = ()


def log_softmax(scores: Sequence[float]) -> list[float]:
    """log(softmax(scores)); -inf stays -inf. At least one score must be finite."""
    top = max(scores)
    total = math.fsum(math.exp(s - top) for s in scores if s != -math.inf)
    shift = top + math.log(total)
    return [s - shift for s in scores]


def distribution(
    logits: Sequence[float],
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> list[float]:
    """The logprob of every token id at one step, from its processed logits (see above).

    top-k keeps every score >= the k-th largest; top-p keeps tokens, most likely first, while
    the probability before them is < top_p; then min-p keeps those of probability >= min_p x
    the likeliest's (hf_logits.sample's rules, the same in torch; exllamav2's order)."""
    if temperature == 0:
        return log_softmax(logits)
    scores = [x / temperature for x in logits]
    if 0 < top_k < len(scores):
        kth = sorted(scores, reverse=True)[top_k - 1]
        scores = [s if s >= kth else -math.inf for s in scores]
    logp = log_softmax(scores)
    if top_p < 1.0:
        kept: set[int] = set()
        mass = 0.0
        for i in sorted(range(len(logp)), key=lambda i: -logp[i]):
            if mass >= top_p:
                break
            kept.add(i)
            mass += math.exp(logp[i])
        logp = log_softmax([x if i in kept else -math.inf for i, x in enumerate(logp)])
    if min_p > 0:
        floor = max(logp) + math.log(min_p)
        logp = log_softmax([x if x >= floor else -math.inf for x in logp])
    return logp


def ranked(logprobs: Sequence[float], k: int) -> list[int]:
    """The k token ids of highest logprob, highest first (equals: the lower id first)."""
    return sorted(range(len(logprobs)), key=lambda i: (-logprobs[i], i))[:k]


def step(logprobs: Sequence[float], chosen: int, k: int, describe: Describe) -> StepLogprobs:
    """What a step reports: the chosen token's logprob and the k most likely tokens'."""

    def one(token: int) -> TokenLogprob:
        text, utf8 = describe(token)
        return TokenLogprob(token=text, utf8=utf8, logprob=logprobs[token])

    return StepLogprobs(chosen=one(chosen), top=tuple(one(t) for t in ranked(logprobs, k)))


def reported(logprob: float) -> float:
    """A logprob as JSON carries it: -inf (a token the sampler could not draw) is FLOOR."""
    return max(logprob, FLOOR)


# The GPT-2 byte-level alphabet (byte-level BPE tokenizers: GPT-2, Llama 3, Qwen, the demo
# model): each byte is one printable character in a token's stored name.
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
_BYTE_OF = {chr(b): b for b in _PRINTABLE} | {
    chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in _PRINTABLE)
}


def byte_level(piece: str) -> bytes | None:
    """A byte-level BPE token's bytes from its stored name ("Ġhi" -> b" hi"); None if the
    name is not in that alphabet."""
    if not piece or any(c not in _BYTE_OF for c in piece):
        return None
    return bytes(_BYTE_OF[c] for c in piece)
