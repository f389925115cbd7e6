"""A request's choices: how many engine jobs it runs (n, or best_of candidates) and each one's
parameters. Pure, no I/O."""

from __future__ import annotations

import msgspec

from schemas.inference import CompletionRequest, SamplingFields
from services.common.errors import ApiError, invalid
from services.worker.engines.params import SamplingParams


def candidates(req: SamplingFields, max_n: int, max_in_flight: int) -> int | ApiError:
    """How many jobs a request runs, or why it cannot here: n choices, or (completions) best_of
    candidates of which the n likeliest are answered. Each job holds a slot, so their number
    may pass neither the worker's max_n nor the model's slots (never admitted)."""
    best_of = req.best_of if isinstance(req, CompletionRequest) else None
    jobs, param = (req.n, "n") if best_of is None else (best_of, "best_of")
    if best_of is not None and best_of < req.n:
        return invalid(f"best_of ({best_of}) must be at least n ({req.n})", param="best_of")
    if jobs > req.n and req.stream:  # as OpenAI: the best are known only at the end
        return invalid(
            "best_of cannot be streamed: send stream false, or best_of = n", param="best_of"
        )
    if jobs > max_n:
        return invalid(
            f"{param}={jobs} is more than this worker serves (at most {max_n})", param=param
        )
    if jobs > max_in_flight:
        return invalid(
            f"{param}={jobs} is more than the {max_in_flight} sequences this model runs at once "
            "(its max_in_flight): each takes one",
            param=param,
        )
    return jobs


def ranked(params: SamplingParams) -> SamplingParams:
    """A best_of candidate's parameters: its tokens' logprobs are what it is ranked by."""
    return params if params.logprobs is not None else msgspec.structs.replace(params, logprobs=0)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice index's own job parameters: seed + index when seeded, so choices differ and
    each stays reproducible (unseeded choices draw their own randomness)."""
    if params.seed is None or index == 0:
        return params
    return msgspec.structs.replace(params, seed=params.seed + index)
