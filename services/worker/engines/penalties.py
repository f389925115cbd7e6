"""Penalties and logit bias as pure math: OpenAI's presence/frequency/logit_bias, vLLM's
repetition_penalty. Numbers in, numbers out; every engine applies exactly this rule.

For each token t, to the logits of one step, before temperature and sampling:
  1. repetition_penalty r (CTRL, as vLLM): if t is in the prompt or the completion so far,
     a positive logit is divided by r, any other multiplied by r (1.0: off);
  2. logit -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0), where count
     is over the completion's tokens so far only (OpenAI's rule: the prompt does not count);
  3. logit += logit_bias[t].
Steps 2 and 3 add, so their order is moot; 1 comes first as in exllamav2's sampler (vLLM adds
logit_bias before its penalties: the two differ only when repetition_penalty and logit_bias
touch the same token).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

_TOKEN_ID = re.compile(r"[0-9]{1,10}")


class Knobs(Protocol):
    """What a request asked for (SamplingParams has these)."""

    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def logit_bias(self) -> tuple[tuple[int, float], ...]: ...


class Rule(NamedTuple):
    """What the rules know about one token at one step."""

    in_context: bool  # in the prompt or the completion so far (repetition_penalty)
    times: int  # in the completion so far (frequency and presence)
    bias: float


class BadBias(ValueError):
    """A logit_bias key that is not a token id of the model."""


def active(p: Knobs) -> bool:
    """Whether p changes any logit at all (engines skip the work when not)."""
    return bool(
        p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 or p.logit_bias
    )


def parse_bias(
    logit_bias: Mapping[str, float] | None, vocab_size: int
) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"<token id>": bias} as (id, bias) pairs; BadBias names a key the model lacks."""
    pairs: list[tuple[int, float]] = []
    for key, bias in (logit_bias or {}).items():
        if not _TOKEN_ID.fullmatch(key) or int(key) >= vocab_size:
            raise BadBias(
                f"logit_bias key {key!r} is not a token id of this model (0..{vocab_size - 1})"
            )
        pairs.append((int(key), bias))
    return tuple(sorted(pairs))


def rules(prompt: Sequence[int], completion: Sequence[int], p: Knobs) -> dict[int, Rule]:
    """The tokens whose logit p may change at the next step, and what applies to each."""
    counts = Counter(completion) if p.presence_penalty or p.frequency_penalty else Counter()
    context = set(prompt).union(completion) if p.repetition_penalty != 1.0 else set()
    bias = dict(p.logit_bias)
    return {
        t: Rule(in_context=t in context, times=counts[t], bias=bias.get(t, 0.0))
        for t in context.union(counts, bias)
    }


def penalized(logit: float, rule: Rule, p: Knobs) -> float:
    """One token's logit after the penalties and its bias."""
    if rule.in_context and p.repetition_penalty != 1.0:
        logit = logit / p.repetition_penalty if logit > 0 else logit * p.repetition_penalty
    logit -= p.frequency_penalty * rule.times + p.presence_penalty * (rule.times > 0)
    return logit + rule.bias


def apply(
    logits: Sequence[float], prompt: Sequence[int], completion: Sequence[int], p: Knobs
) -> list[float]:
    """All of a step's logits (index = token id) after the rules."""
    out = list(logits)
    for t, rule in rules(prompt, completion, p).items():
        if 0 <= t < len(out):
            out[t] = penalized(out[t], rule, p)
    return out


def completion_penalty(count_before: int, p: Knobs) -> float:
    """How much one more occurrence of a token in the completion lowers its logit: the
    frequency penalty each time, the presence penalty the first time (the sum over a token's
    occurrences is step 2 above)."""
    return p.frequency_penalty + (p.presence_penalty if count_before == 0 else 0.0)
