"""Torch logits steps of the transformers engine: penalties, bans, the grammar mask, sampling."""

from __future__ import annotations

from typing import Any

from services.worker.engines import penalties
from services.worker.engines.base import SamplingParams


def penalize(logits: Any, prompt: list[int], completion: list[int], params: SamplingParams) -> Any:
    """One step's logits (a 1-D tensor) after penalties.py's rule: only the tokens it touches
    are read and written, so a large vocabulary costs nothing extra."""
    import torch

    width = logits.numel()
    touched = {t: r for t, r in penalties.rules(prompt, completion, params).items() if t < width}
    if not touched:
        return logits
    index = torch.tensor(list(touched), dtype=torch.long)
    old = logits[index].tolist()
    new = [penalties.penalized(v, r, params) for v, r in zip(old, touched.values(), strict=True)]
    out = logits.clone()
    out[index] = torch.tensor(new, dtype=logits.dtype)
    return out


def stop_tokens(params: SamplingParams, eos_ids: set[int], constrained: bool) -> frozenset[int]:
    """The tokens that end a job: the model's end tokens (unless ignore_eos; a grammar's end
    still ends it) and vLLM's stop_token_ids."""
    ends = set() if params.ignore_eos and not constrained else eos_ids
    return frozenset(ends.union(params.stop_token_ids))


def ban(logits: Any, tokens: frozenset[int]) -> Any:
    """One step's logits with the given tokens at -inf (those past the logits' width ignored)."""
    width = logits.numel()
    index = [t for t in tokens if t < width]
    if not index:
        return logits
    out = logits.clone()
    out[index] = float("-inf")
    return out


def constrain(logits: Any, allowed: bytes) -> Any:
    """One step's logits with the tokens the grammar forbids (allowed[t] == 0, or t past the
    tokenizer's vocabulary: the head's padding) at -inf."""
    import torch

    ok = torch.frombuffer(bytearray(allowed), dtype=torch.uint8).bool()
    width = logits.numel()
    if ok.numel() < width:
        ok = torch.cat([ok, torch.zeros(width - ok.numel(), dtype=torch.bool)])
    return logits.masked_fill(~ok[:width], float("-inf"))


def sample(logits: Any, params: SamplingParams, rng: Any) -> int:
    """Greedy at temperature 0, else temperature, top-k and top-p (nucleus) sampling."""
    import torch

    if params.temperature == 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probabilities(logits, params), 1, generator=rng))


def distribution(logits: Any, params: SamplingParams) -> Any:
    """logprobs.distribution in torch: the log of what sample() draws from (greedy: the logits'
    log_softmax at temperature 1). Tokens top-k / top-p leave out are -inf."""
    import torch

    if params.temperature == 0:
        return torch.log_softmax(logits.float(), dim=-1)
    return torch.log(probabilities(logits, params))


def torch_topk(logprobs: Any, k: int) -> list[tuple[int, float]]:
    """The k (token, logprob) pairs of highest logprob, highest first."""
    import torch

    if k <= 0:
        return []
    top = torch.topk(logprobs, min(k, logprobs.numel()))
    return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


def probabilities(logits: Any, params: SamplingParams) -> Any:
    """What sampling at temperature > 0 draws from: temperature, then top-k, top-p, min-p."""
    import torch

    scores = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    if params.min_p > 0:  # vLLM's min_p, last as in exllamav2's sampler
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs
