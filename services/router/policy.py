"""Replica choice policies: cost (estimated time to first token) and least busy. Pure, no I/O.

Cost: for each candidate, estimated TTFT = expected queue wait + prefill of the prompt tokens it
does not hold in its prefix cache.
- busy = in_flight + queue_depth (its last heartbeat) + requests this router sent it since.
- queue wait = 0 while busy < max_in_flight, else (busy - max_in_flight + 1) x service_s /
  max_in_flight: a free slot opens every service_s / max_in_flight seconds on average.
- prefill = (prompt tokens - cached tokens) / prefill_tokens_per_s. Prompt tokens are estimated
  from the canonical prompt's bytes (BYTES_PER_TOKEN, about right for English with BPE
  tokenizers); cached tokens = the request's leading blocks the worker holds x TOKENS_PER_BLOCK.
- A rate a worker has not measured yet (None) is the mean of the candidates that did, else the
  fleet default (Defaults), never 0: a new replica is taken to be like its peers, so a constant
  guess does not decide between a measured replica and an unmeasured one.
The least estimate wins. Candidates within a tolerance of it are ties: among those, the least
busy, then a random one (randomness passed in), so routers with the same view do not all pick
the same replica. A saturated replica's queue wait grows with every request queued on it, so
prefix affinity yields to load without a rule of its own.

The gateway's deadline (deadline.py) uses the same estimate, whatever the policy: a replica whose
load is unknown (known=False: no heartbeat gives it) counts as 0 there (known_estimate_s).

Least busy (the policy before cost, ROUTER_POLICY=least_busy): the least busy, ties to the
smallest id.

Spread (both policies, while some candidate has sent no heartbeat yet): the least busy, counting
only this router's dispatches for the unknown ones, ties at random (cost) or by id (least busy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import msgspec

from schemas.prefix import BLOCK_BYTES

PolicyName = Literal["cost", "least_busy"]
BYTES_PER_TOKEN = 4
TOKENS_PER_BLOCK = BLOCK_BYTES // BYTES_PER_TOKEN
Draw = Callable[[], float]  # uniform in [0, 1): random.Random().random, injected by the shell


class Prompt(msgspec.Struct, frozen=True):
    """What the choice knows of a request's prompt: its estimated tokens and its block hashes."""

    tokens: int = 0
    blocks: tuple[int, ...] = ()

    @classmethod
    def of(cls, text_bytes: int, blocks: tuple[int, ...]) -> Prompt:
        return cls(tokens=text_bytes // BYTES_PER_TOKEN, blocks=blocks)


class Defaults(msgspec.Struct, frozen=True, kw_only=True):
    """Rates for when no candidate has measured them yet, and what counts as a tie.

    service_s: a chat answer of ~200 tokens at ~200 tokens/s. prefill_tokens_per_s: a modest GPU
    prefilling a 7-8B model (real ones do 5-50k; the sim's is configurable). Only their order
    of magnitude matters: with every candidate on the same defaults, load decides."""

    service_s: float = 1.0
    prefill_tokens_per_s: float = 5000.0
    tie_ratio: float = 0.05  # within 5 % of the best estimate ...
    tie_s: float = 0.002  # ... or 2 ms of it: a tie


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """One eligible replica as the policy sees it."""

    worker_id: str
    busy: int
    max_in_flight: int = 1
    service_s: float | None = None
    prefill_tokens_per_s: float | None = None
    cached_blocks: int = 0
    known: bool = True  # False: no heartbeat gives its load for the model (never heard, or off)


def queue_wait_s(c: Candidate, defaults: Defaults) -> float:
    excess = c.busy - c.max_in_flight
    if excess < 0:
        return 0.0
    service = c.service_s if c.service_s else defaults.service_s
    return (excess + 1) * service / c.max_in_flight


def prefill_s(c: Candidate, prompt: Prompt, defaults: Defaults) -> float:
    rate = c.prefill_tokens_per_s or defaults.prefill_tokens_per_s
    cached = c.cached_blocks * TOKENS_PER_BLOCK
    return max(prompt.tokens - cached, 0) / rate


def estimate_s(c: Candidate, prompt: Prompt, defaults: Defaults) -> float:
    """Estimated seconds to the first token on this replica."""
    return queue_wait_s(c, defaults) + prefill_s(c, prompt, defaults)


def known_estimate_s(c: Candidate, prompt: Prompt, defaults: Defaults) -> float:
    """estimate_s, except that a replica whose load is unknown may start at once (0): the
    deadline then never refuses or holds a request on a guess (its worker still protects itself)."""
    return estimate_s(c, prompt, defaults) if c.known else 0.0


def within(
    candidates: Sequence[Candidate], prompt: Prompt, defaults: Defaults, budget_s: float
) -> list[Candidate]:
    """Those whose estimated TTFT (unknown load: 0) is at most budget_s."""
    defaults = with_peers(candidates, defaults)
    return [c for c in candidates if known_estimate_s(c, prompt, defaults) <= budget_s]


def least_estimate_s(candidates: Sequence[Candidate], prompt: Prompt, defaults: Defaults) -> float:
    """The least estimated TTFT among them (unknown load: 0)."""
    defaults = with_peers(candidates, defaults)
    return min(known_estimate_s(c, prompt, defaults) for c in candidates)


def with_peers(candidates: Sequence[Candidate], defaults: Defaults) -> Defaults:
    """The defaults for this choice: the measuring candidates' mean rates, else the fleet's."""
    services = [c.service_s for c in candidates if c.service_s]
    rates = [c.prefill_tokens_per_s for c in candidates if c.prefill_tokens_per_s]
    return msgspec.structs.replace(
        defaults,
        service_s=sum(services) / len(services) if services else defaults.service_s,
        prefill_tokens_per_s=sum(rates) / len(rates) if rates else defaults.prefill_tokens_per_s,
    )


def pick_at_random(tied: Sequence[Candidate], draw: Draw) -> Candidate:
    """One of `tied` (all equally good), by the injected draw; sorted first so a seed decides."""
    ordered = sorted(tied, key=lambda c: c.worker_id)
    return ordered[min(int(draw() * len(ordered)), len(ordered) - 1)]


def least_busy(candidates: Sequence[Candidate], draw: Draw | None) -> Candidate:
    """The least busy; ties at random with a draw, else to the smallest id."""
    fewest = min(c.busy for c in candidates)
    tied = [c for c in candidates if c.busy == fewest]
    if draw is None:
        return min(tied, key=lambda c: c.worker_id)
    return pick_at_random(tied, draw)


def cheapest(
    candidates: Sequence[Candidate], prompt: Prompt, defaults: Defaults, draw: Draw
) -> tuple[Candidate, float]:
    """The candidate with the least estimated TTFT (ties: least busy, then at random)."""
    defaults = with_peers(candidates, defaults)
    estimates = {c.worker_id: estimate_s(c, prompt, defaults) for c in candidates}
    best = min(estimates.values())
    bound = max(best * (1 + defaults.tie_ratio), best + defaults.tie_s)
    tied = [c for c in candidates if estimates[c.worker_id] <= bound]
    chosen = least_busy(tied, draw)
    return chosen, estimates[chosen.worker_id]
