"""Penalties and logit bias: the pure rule against hand-computed numbers and a naive reference,
the logit_bias key check, the transformers engine's tensor variant."""

from __future__ import annotations

import random

import pytest
import torch

from services.worker.engines import penalties
from services.worker.engines.base import SamplingParams
from services.worker.engines.hf_logits import penalize

LOGITS = [2.0, -1.0, 0.5, 0.0, 3.0]


def params(**knobs: object) -> SamplingParams:
    return SamplingParams(max_tokens=1, **knobs)  # type: ignore[arg-type]


def reference(
    logits: list[float], prompt: list[int], completion: list[int], p: SamplingParams
) -> list[float]:
    """The rule as the docs state it, token by token over the whole vocabulary."""
    out = []
    for t, logit in enumerate(logits):
        if t in prompt or t in completion:
            logit = logit / p.repetition_penalty if logit > 0 else logit * p.repetition_penalty
        count = completion.count(t)
        logit -= p.frequency_penalty * count
        if count > 0:
            logit -= p.presence_penalty
        logit += dict(p.logit_bias).get(t, 0.0)
        out.append(logit)
    return out


@pytest.mark.parametrize(
    ("knobs", "prompt", "completion", "expected"),
    [
        # nothing asked: the logits as they were
        ({}, [0, 1], [4, 4], LOGITS),
        # frequency counts every completion occurrence (4 twice), never the prompt's (0)
        ({"frequency_penalty": 0.5}, [0], [4, 4, 2], [2.0, -1.0, 0.0, 0.0, 2.0]),
        # presence once per token however often it came
        ({"presence_penalty": 1.0}, [0], [4, 4, 2], [2.0, -1.0, -0.5, 0.0, 2.0]),
        # both, and negative values reward repetition
        (
            {"presence_penalty": -1.0, "frequency_penalty": 0.25},
            [],
            [1, 1, 1],
            [2.0, -1.0 - 0.75 + 1.0, 0.5, 0.0, 3.0],
        ),
        # repetition: prompt and completion alike; positive divided, negative/zero multiplied
        ({"repetition_penalty": 2.0}, [0, 1], [3, 4], [1.0, -2.0, 0.5, 0.0, 1.5]),
        ({"repetition_penalty": 0.5}, [0, 1], [], [4.0, -0.5, 0.5, 0.0, 3.0]),
        # logit_bias adds, to any token, in or out of the context
        ({"logit_bias": ((2, -100.0), (3, 100.0))}, [2], [], [2.0, -1.0, -99.5, 100.0, 3.0]),
        # repetition first, then the additive terms (exllamav2's order)
        (
            {
                "repetition_penalty": 2.0,
                "frequency_penalty": 1.0,
                "presence_penalty": 0.5,
                "logit_bias": ((4, 1.0),),
            },
            [],
            [4],
            [2.0, -1.0, 0.5, 0.0, 3.0 / 2 - 1.0 - 0.5 + 1.0],
        ),
    ],
)
def test_apply_by_hand(
    knobs: dict[str, object], prompt: list[int], completion: list[int], expected: list[float]
) -> None:
    p = params(**knobs)
    assert penalties.apply(LOGITS, prompt, completion, p) == pytest.approx(expected)
    assert reference(LOGITS, prompt, completion, p) == pytest.approx(expected)


def test_apply_matches_the_reference_on_random_cases() -> None:
    rng = random.Random(7)
    for _ in range(300):
        vocab = rng.randrange(1, 12)
        logits = [rng.uniform(-5, 5) for _ in range(vocab)]
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(6))]
        completion = [rng.randrange(vocab) for _ in range(rng.randrange(10))]
        bias = {rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(rng.randrange(3))}
        p = params(
            presence_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
            frequency_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
            repetition_penalty=rng.choice([1.0, rng.uniform(0.1, 3)]),
            logit_bias=tuple(sorted(bias.items())),
        )
        got = penalties.apply(logits, prompt, completion, p)
        assert got == pytest.approx(reference(logits, prompt, completion, p))


@pytest.mark.parametrize(
    ("knobs", "active"),
    [
        ({}, False),
        ({"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}, False),
        ({"presence_penalty": -0.1}, True),
        ({"frequency_penalty": 2.0}, True),
        ({"repetition_penalty": 1.1}, True),
        ({"logit_bias": ((0, 0.0),)}, True),
    ],
)
def test_active(knobs: dict[str, object], active: bool) -> None:
    assert penalties.active(params(**knobs)) is active


def test_completion_penalty_sums_to_the_rule() -> None:
    # the exllamav2 path adds one token's penalty per occurrence; the sum is step 2
    p = params(frequency_penalty=0.3, presence_penalty=1.1)
    steps = [penalties.completion_penalty(n, p) for n in range(4)]
    for count in range(5):
        assert sum(steps[:count]) == pytest.approx(0.3 * count + 1.1 * (count > 0))


@pytest.mark.parametrize(
    ("bias", "vocab", "parsed"),
    [
        (None, 10, ()),
        ({}, 10, ()),
        ({"9": -100.0, "0": 5.0}, 10, ((0, 5.0), (9, -100.0))),
    ],
)
def test_parse_bias(bias: dict[str, float] | None, vocab: int, parsed: object) -> None:
    assert penalties.parse_bias(bias, vocab) == parsed


@pytest.mark.parametrize("key", ["10", "-1", "x", "1.0", " 1", "+1", "", "1" * 11, "\u0661"])
def test_parse_bias_names_a_key_the_model_lacks(key: str) -> None:
    with pytest.raises(penalties.BadBias, match=r"logit_bias key .* not a token id.*0\.\.9"):
        penalties.parse_bias({"3": 1.0, key: 1.0}, 10)


def test_penalize_tensor_matches_the_pure_rule() -> None:
    rng = random.Random(3)
    cases: list[dict[str, object]] = [
        {"repetition_penalty": 1.3, "logit_bias": ((7, 50.0), (1, -3.0))},
        {"frequency_penalty": 0.7, "presence_penalty": -0.4},
        {"repetition_penalty": 0.8, "frequency_penalty": 2.0, "logit_bias": ((9, 1.0),)},
    ]
    for knobs in cases * 3:
        logits = [rng.uniform(-4, 4) for _ in range(10)]
        prompt = [rng.randrange(10) for _ in range(4)] + [12]  # 12: past the logits, ignored
        completion = [rng.randrange(10) for _ in range(6)]
        p = params(**knobs)
        got = penalize(torch.tensor(logits), prompt, completion, p).tolist()
        assert got == pytest.approx(penalties.apply(logits, prompt, completion, p), rel=1e-5)
    untouched = torch.tensor(LOGITS)
    assert penalize(untouched, [0], [1], params(frequency_penalty=1.0)).tolist()[0] == 2.0
    assert untouched.tolist() == LOGITS  # a copy is changed, never the model's output
