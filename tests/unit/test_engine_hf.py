"""cache_kwarg: the keyword forward() takes the KV cache by, across transformers releases."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import torch

from services.worker.engines import logprobs
from services.worker.engines.hf import cache_kwarg
from services.worker.engines.hf_logits import ban, probabilities, stop_tokens
from services.worker.engines.params import SamplingParams


def renamed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Stands for transformers' own decorators on forward() (deprecate_kwarg and the like)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


class Current:  # transformers >= 5.24: `cache`, with `past_key_values` still accepted (warned)
    @renamed
    def forward(
        self, input_ids: Any = None, cache: Any = None, use_cache: Any = None, **kwargs: Any
    ) -> None: ...


class Older:  # transformers < 5.24: **kwargs would swallow `cache` without a word
    @renamed
    def forward(
        self,
        input_ids: Any = None,
        past_key_values: Any = None,
        use_cache: Any = None,
        **kwargs: Any,
    ) -> None: ...


def test_current_releases_take_cache() -> None:
    assert cache_kwarg(Current()) == "cache"


def test_older_releases_take_past_key_values() -> None:
    assert cache_kwarg(Older()) == "past_key_values"


# ---- vLLM's min_p, stop_token_ids, min_tokens, ignore_eos ----


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [(1.0, 0, 1.0, 0.3), (0.7, 5, 1.0, 0.5), (1.3, 0, 0.8, 0.2), (1.0, 0, 1.0, 1.0)],
)
def test_min_p_is_the_pure_rule_in_torch(
    temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    """hf_logits.sample draws from logprobs.distribution's rule: min-p after top-k and top-p."""
    logits = [2.0, 1.5, 1.4, 0.3, -1.0, 0.9, 1.9, -3.0]
    params = SamplingParams(
        max_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
    )
    torch_dist = torch.log(probabilities(torch.tensor(logits), params)).tolist()
    pure = logprobs.distribution(logits, temperature, top_k, top_p, min_p)
    assert [math.isinf(x) for x in torch_dist] == [math.isinf(x) for x in pure]
    assert any(math.isinf(x) for x in pure)  # min_p left some out
    for a, b in zip(torch_dist, pure, strict=True):
        assert math.isinf(a) or math.isclose(a, b, abs_tol=1e-5)


def test_stop_tokens_and_the_end_token() -> None:
    plain = SamplingParams(max_tokens=4, stop_token_ids=(7,))
    assert stop_tokens(plain, {2}, constrained=False) == {2, 7}
    ignoring = msgspec.structs.replace(plain, ignore_eos=True)
    assert stop_tokens(ignoring, {2}, constrained=False) == {7}
    assert stop_tokens(ignoring, {2}, constrained=True) == {2, 7}  # a grammar's end ends


def test_ban_sets_only_those_tokens_to_minus_infinity() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0])
    out = ban(logits, frozenset({1, 9}))  # 9: past the logits (the head's padding)
    assert out.tolist() == [1.0, -math.inf, 3.0]
    assert logits.tolist() == [1.0, 2.0, 3.0]
    assert ban(logits, frozenset()) is logits
