"""cache_kwarg: the keyword forward() takes the KV cache by, across transformers releases."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from services.worker.engines.hf import cache_kwarg


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
