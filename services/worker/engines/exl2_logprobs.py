"""exllamav2's token probabilities as logprobs.py's values: what a dynamic generator job is asked
to return, and the logprobs of the tokens each of its results carries.

No exllamav2 import (tensors are read through their own methods), so tests/unit runs it against
results shaped as exllamav2 emits them; tests/gpu against the real generator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from services.worker.engines.logprobs import Describe, StepLogprobs, TokenLogprob
from services.worker.engines.params import SamplingParams


def job_options(params: SamplingParams) -> dict[str, bool | int]:
    """ExLlamaV2DynamicJob arguments that make its results carry what logprobs need (none when
    not asked: they cost a copy per token).

    Sampling: the probability of each token and of the top k, which exllamav2 reports after its
    temperature, top-k and top-p, renormalized: logprobs.distribution as it stands. Greedy: that
    distribution is a point mass (top_k 1), so the job returns its logits instead, which
    exllamav2's sampler has already penalized and biased in place when it returns them (read in
    0.2.7's sampler.py and dynamic.py; tests/gpu checks it with a forcing logit_bias): their
    log_softmax is the rule's greedy case."""
    if params.logprobs is None:
        return {}
    if params.temperature == 0:
        return {"return_logits": True}
    return {"return_probs": True, "return_top_tokens": params.logprobs}


def result_logprobs(
    result: Mapping[str, Any], k: int, vocab_size: int, describe: Describe
) -> tuple[StepLogprobs, ...]:
    """The logprobs of the tokens one generator result carries (see job_options)."""
    ids = result.get("token_ids")
    if ids is None:
        return ()
    tokens: list[int] = ids[0].tolist()

    def one(token: int, logprob: float) -> TokenLogprob:
        text, utf8 = describe(token)
        return TokenLogprob(token=text, utf8=utf8, logprob=logprob)

    logits = result.get("logits")
    if logits is not None:  # greedy; the head pads the vocabulary: those ids are no tokens
        dist = logits[0, :, : vocab_size or logits.shape[-1]].float().log_softmax(dim=-1)
        steps = []
        for i, token in enumerate(tokens):
            best = dist[i].topk(min(k, dist.shape[-1]))  # sorted, highest first
            top = zip(best.indices.tolist(), best.values.tolist(), strict=True)
            steps.append(
                StepLogprobs(
                    chosen=one(token, float(dist[i, token])),
                    top=tuple(one(t, lp) for t, lp in top),
                )
            )
        return tuple(steps)
    probs: list[float] = result["token_probs"][0].tolist()
    top_ids = result["top_k_tokens"][0].tolist() if k else [[] for _ in tokens]
    top_probs = result["top_k_probs"][0].tolist() if k else [[] for _ in tokens]
    return tuple(
        StepLogprobs(
            chosen=one(t, _log(p)),
            top=tuple(one(x, _log(q)) for x, q in zip(top_ids[i], top_probs[i], strict=True)),
        )
        for i, (t, p) in enumerate(zip(tokens, probs, strict=True))
    )


def _log(prob: float) -> float:
    """exllamav2 fills the top k past its candidates with probability 0: -inf (FLOOR)."""
    return math.log(prob) if prob > 0 else -math.inf


def unnamed(token: int) -> tuple[str, bytes]:
    """A token named by its id, for a loop given no tokenizer."""
    text = f"<{token}>"
    return text, text.encode()
