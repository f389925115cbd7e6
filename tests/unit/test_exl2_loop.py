"""The exllamav2 generator thread on CPU: result translation, jobs joining between steps,
cancellation, a failed step, a refused job, shutdown.

exllamav2 needs CUDA, so here the loop drives a scripted generator with the dynamic generator's
interface (enqueue / iterate / cancel / active_jobs, results shaped as exllamav2 0.3.2 emits
them, token ids as torch tensors). tests/gpu runs the same loop against the real generator.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from services.worker.engines import grammar, logprobs
from services.worker.engines.base import Chunk, EngineError, Job, SamplingParams
from services.worker.engines.exl2_jobs import (
    CompletionPenalty,
    chunk_for,
    needs_bias,
    sampler_settings,
    stop_conditions,
)
from services.worker.engines.exl2_logprobs import job_options, result_logprobs
from services.worker.engines.exl2_loop import GeneratorLoop
from services.worker.engines.logprobs import StepLogprobs, TokenLogprob
from tests.helpers import eventually


def ids(n: int) -> torch.Tensor:
    return torch.zeros((1, n), dtype=torch.long)


@pytest.mark.parametrize(
    ("result", "counted", "chunk", "after"),
    [
        ({"stage": "started", "identifier": 1}, 0, None, 0),
        ({"stage": "prefill", "identifier": 1}, 0, None, 0),
        (
            {"stage": "streaming", "eos": False, "text": "Hi", "token_ids": ids(1)},
            0,
            Chunk(text="Hi", tokens=1),
            1,
        ),
        # exllamav2 holds text back while a stop string may be starting: tokens, no text yet
        ({"stage": "streaming", "eos": False, "token_ids": ids(2)}, 3, Chunk(text="", tokens=2), 5),
        ({"stage": "streaming", "eos": False}, 3, None, 3),
        (
            {
                "stage": "streaming",
                "eos": True,
                "eos_reason": "max_new_tokens",
                "text": "!",
                "token_ids": ids(1),
                "new_tokens": 8,
            },
            7,
            Chunk(text="!", tokens=1, finish_reason="length"),
            8,
        ),
        # the final result's new_tokens is the truth: held tokens never streamed still count
        (
            {"stage": "streaming", "eos": True, "eos_reason": "stop_token", "new_tokens": 6},
            4,
            Chunk(text="", tokens=2, finish_reason="stop"),
            6,
        ),
        (
            {
                "stage": "streaming",
                "eos": True,
                "eos_reason": "stop_string",
                "text": " done",
                "new_tokens": 9,
            },
            9,
            Chunk(text=" done", tokens=0, finish_reason="stop"),
            9,
        ),
        # no new_tokens on the final result: count what it carries
        (
            {"stage": "streaming", "eos": True, "eos_reason": "end_filter", "token_ids": ids(1)},
            2,
            Chunk(text="", tokens=1, finish_reason="stop"),
            3,
        ),
    ],
)
def test_chunk_for(result: dict[str, Any], counted: int, chunk: Chunk | None, after: int) -> None:
    assert chunk_for(result, counted) == (chunk, after)


PENALTIES_OFF = {
    "token_repetition_penalty": 1.0,
    "token_repetition_range": -1,
    "token_repetition_decay": 0,
    "token_frequency_penalty": 0.0,
    "token_presence_penalty": 0.0,
}


@pytest.mark.parametrize(
    ("params", "settings"),
    [
        (
            SamplingParams(max_tokens=8, temperature=0),
            {"temperature": 1.0, "top_k": 1, "top_p": 0.0, "min_p": 0.0, **PENALTIES_OFF},
        ),
        # OpenAI defaults: plain sampling, every exllamav2 filter and penalty off
        (
            SamplingParams(max_tokens=8),
            {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, **PENALTIES_OFF},
        ),
        (
            SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, top_k=40, seed=3),
            {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.0, **PENALTIES_OFF},
        ),
        # repetition over the whole sequence (prompt too); exllamav2's frequency and presence
        # penalties stay off whatever was asked (they would count the prompt): the token bias
        # carries OpenAI's
        (
            SamplingParams(
                max_tokens=8,
                temperature=0,
                repetition_penalty=1.3,
                frequency_penalty=0.5,
                presence_penalty=-1.0,
                logit_bias=((5, 10.0),),
            ),
            {"temperature": 1.0, "top_k": 1, "top_p": 0.0, "min_p": 0.0, **PENALTIES_OFF}
            | {"token_repetition_penalty": 1.3},
        ),
        (
            SamplingParams(max_tokens=8, temperature=1.2, repetition_penalty=0.9),
            {"temperature": 1.2, "top_k": 0, "top_p": 1.0, "min_p": 0.0, **PENALTIES_OFF}
            | {"token_repetition_penalty": 0.9},
        ),
        # vLLM's min_p: exllamav2's own (applied after top-k and top-p, as logprobs.py's rule);
        # 1 keeps only the likeliest, which exllamav2 would read as off: top_k 1 says it
        (
            SamplingParams(max_tokens=8, min_p=0.1, top_k=40),
            {"temperature": 1.0, "top_k": 40, "top_p": 1.0, "min_p": 0.1, **PENALTIES_OFF},
        ),
        (
            SamplingParams(max_tokens=8, min_p=1.0),
            {"temperature": 1.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, **PENALTIES_OFF},
        ),
        (  # greedy: nothing to filter
            SamplingParams(max_tokens=8, temperature=0, min_p=0.5),
            {"temperature": 1.0, "top_k": 1, "top_p": 0.0, "min_p": 0.0, **PENALTIES_OFF},
        ),
    ],
)
def test_sampler_settings_say_exactly_what_the_request_asked(
    params: SamplingParams, settings: dict[str, float]
) -> None:
    assert sampler_settings(params) == settings


JSON = grammar.json_object()


@pytest.mark.parametrize(
    ("params", "stops"),
    [
        (SamplingParams(max_tokens=8, stop=("x",)), [2, "x"]),
        (SamplingParams(max_tokens=8, stop_token_ids=(5, 7), stop=("x",)), [2, 5, 7, "x"]),
        # ignore_eos: the end token is an ordinary token; under a grammar its end still ends
        (SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=(5,)), [5]),
        (SamplingParams(max_tokens=8, ignore_eos=True, constraint=JSON), [2]),
    ],
)
def test_stop_conditions_end_on_the_end_token_and_stop_token_ids(
    params: SamplingParams, stops: list[int | str]
) -> None:
    """exllamav2 ends a job on these, and holds the token ids among them back until
    min_new_tokens (min_tokens) are generated."""
    assert stop_conditions(params, eos=2) == stops


@pytest.mark.parametrize(
    ("knobs", "needs"),
    [
        ({}, False),
        ({"repetition_penalty": 1.5}, False),  # exllamav2's own penalty, no bias
        ({"logit_bias": ((1, -1.0),)}, True),
        ({"frequency_penalty": 0.1}, True),
        ({"presence_penalty": -0.1}, True),
    ],
)
def test_needs_bias(knobs: dict[str, Any], needs: bool) -> None:
    assert needs_bias(SamplingParams(max_tokens=1, **knobs)) is needs


def test_completion_penalty_takes_each_new_token_once() -> None:
    pen = CompletionPenalty(
        SamplingParams(max_tokens=9, frequency_penalty=0.5, presence_penalty=2.0), 3
    )
    assert pen.done == 3
    assert pen.take([7, 7, 8]) == {7: -(2.5 + 0.5), 8: -2.5}
    assert pen.take([]) == {}
    assert pen.take([8]) == {8: -0.5}
    assert (pen.done, pen.counts) == (7, {7: 2, 8: 2})


VOCAB = 8
PADDING = 3  # exllamav2's head pads the logits past the vocabulary


class ScriptedSequence:
    """exllamav2's SeqTensor, the little of it the loop reads."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def torch(self) -> torch.Tensor:
        return torch.tensor([self.ids], dtype=torch.long)


class ScriptedJob:
    """A job whose model's logits are all 0: greedy picks the first token of the highest
    token_bias, which exllamav2's sampler adds to the logits, so the bias decides."""

    def __init__(self, prompt: torch.Tensor, params: SamplingParams, key: int) -> None:
        self.identifier = key
        self.max_new_tokens = params.max_tokens
        self.new_tokens = 0
        self.sequences = [SimpleNamespace(sequence_ids=ScriptedSequence(prompt[0].tolist()))]
        bias = None
        if needs_bias(params):  # as engine_exl2 builds it
            bias = torch.zeros(VOCAB)
            for token, amount in params.logit_bias:
                bias[token] = amount
        self.gen_settings = SimpleNamespace(token_bias=bias)
        self.options = job_options(params)  # as engine_exl2 passes them to ExLlamaV2DynamicJob
        self.logits = torch.zeros(VOCAB)

    def sample(self) -> int:
        logits = torch.zeros(VOCAB)
        if self.gen_settings.token_bias is not None:
            logits += self.gen_settings.token_bias
        self.logits = logits
        token = int(torch.argmax(logits))
        self.sequences[0].sequence_ids.ids.append(token)
        return token

    def returned(self, token: int) -> dict[str, Any]:
        """What exllamav2 adds to a result when asked: the sampled distribution's probabilities
        (here softmax: no top-k / top-p), or the processed logits with the head's padding."""
        r: dict[str, Any] = {}
        probs = torch.softmax(self.logits, dim=-1)
        if self.options.get("return_probs"):
            r["token_probs"] = probs[token].view(1, 1)
        if k := int(self.options.get("return_top_tokens", 0)):
            top = torch.topk(probs, k)
            r["top_k_tokens"], r["top_k_probs"] = (
                top.indices.view(1, 1, k),
                top.values.view(1, 1, k),
            )
        if self.options.get("return_logits"):
            padded = torch.cat([self.logits, torch.full((PADDING,), 9.0)])
            r["logits"] = padded.view(1, 1, -1)
        return r


class ScriptedGenerator:
    """The dynamic generator's contract: pending jobs start while a batch slot is free, every
    active job gains one token per iterate(), a job ends at max_new_tokens."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.pending: list[ScriptedJob] = []
        self.active_jobs: list[ScriptedJob] = []
        self.steps = 0
        self.started: dict[int, int] = {}  # identifier -> step it started on
        self.ended: dict[int, int] = {}
        self.cancelled: list[int] = []
        self.fail_next = False
        self.thread: threading.Thread | None = None

    def enqueue(self, job: ScriptedJob) -> None:
        self._on_own_thread()
        self.pending.append(job)

    def cancel(self, job: ScriptedJob) -> None:
        self._on_own_thread()
        self.cancelled.append(job.identifier)
        for jobs in (self.pending, self.active_jobs):
            if job in jobs:
                jobs.remove(job)

    def iterate(self) -> list[dict[str, Any]]:
        self._on_own_thread()
        self.steps += 1
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        results: list[dict[str, Any]] = []
        while self.pending and len(self.active_jobs) < self.max_batch:
            job = self.pending.pop(0)
            self.active_jobs.append(job)
            self.started[job.identifier] = self.steps
            results.append({"stage": "started", "identifier": job.identifier})
        for job in list(self.active_jobs):
            job.new_tokens += 1
            token = job.sample()
            r = {"stage": "streaming", "identifier": job.identifier, "eos": False}
            r.update(text=f"<{token}>", token_ids=torch.tensor([[token]]), **job.returned(token))
            if job.new_tokens == job.max_new_tokens:
                r.update(eos=True, eos_reason="max_new_tokens", new_tokens=job.new_tokens)
                self.active_jobs.remove(job)
                self.ended[job.identifier] = self.steps
            results.append(r)
        threading.Event().wait(0.002)  # a GPU step takes time; keeps the loop from spinning
        return results

    def _on_own_thread(self) -> None:
        # every generator call must come from the loop's one thread, never the event loop's
        self.thread = self.thread or threading.current_thread()
        assert threading.current_thread() is self.thread
        assert threading.current_thread() is not threading.main_thread()


def make_job(prompt: torch.Tensor, params: SamplingParams, key: int) -> ScriptedJob:
    """As engine_exl2._new_job: refuses what exllamav2 would."""
    if params.max_tokens <= 0:
        raise ValueError("max_new_tokens must be positive")
    return ScriptedJob(prompt, params, key)


def describe(token: int) -> tuple[str, bytes]:
    return f"<{token}>", f"<{token}>".encode()


@contextmanager
def generator_loop(max_batch: int = 16) -> Iterator[tuple[GeneratorLoop, ScriptedGenerator]]:
    gen = ScriptedGenerator(max_batch)
    loop = GeneratorLoop(gen, make_job, name="exl2-test", describe=describe, vocab_size=VOCAB)
    loop.start()
    try:
        yield loop, gen
    finally:
        loop.stop()


def submit(loop: GeneratorLoop, max_tokens: int, **knobs: Any) -> Job:
    job = Job(prompt_tokens=3)
    loop.submit(job, ids(3), SamplingParams(max_tokens=max_tokens, **knobs))
    return job


async def collect(job: Job) -> list[Chunk]:
    return [c async for c in job]


async def test_jobs_join_the_batch_between_steps() -> None:
    with generator_loop() as (loop, gen):
        early = [submit(loop, 40) for _ in range(2)]
        await eventually(lambda: gen.steps >= 5)
        late = [submit(loop, 10) for _ in range(14)]
        results = await asyncio.gather(*(collect(j) for j in early + late))
        await eventually(lambda: loop.running == 0)
    assert [sum(c.tokens for c in r) for r in results] == [40] * 2 + [10] * 14
    assert all(r[-1].finish_reason == "length" for r in results)
    # the late jobs ran alongside the early ones: started before those ended
    assert max(gen.started[k] for k in range(3, 17)) < min(gen.ended[k] for k in (1, 2))
    assert loop.peak_running == 16


async def test_unpaged_generator_runs_one_at_a_time() -> None:
    with generator_loop(max_batch=1) as (loop, gen):
        results = await asyncio.gather(*(collect(submit(loop, 5)) for _ in range(3)))
    assert [sum(c.tokens for c in r) for r in results] == [5, 5, 5]
    assert loop.peak_running == 1
    assert gen.started[2] > gen.ended[1]
    assert gen.started[3] > gen.ended[2]


async def test_cancel_takes_the_job_out_of_the_generator() -> None:
    with generator_loop() as (loop, gen):
        doomed, kept = submit(loop, 10_000), submit(loop, 30)
        await eventually(lambda: gen.steps >= 3)
        doomed.cancel()
        chunks = await collect(doomed)
        assert chunks[-1].finish_reason == "cancelled"
        assert gen.cancelled == [1]
        assert (await collect(kept))[-1].finish_reason == "length"
        await eventually(lambda: loop.running == 0)
        steps = gen.steps
        await asyncio.sleep(0.1)
        assert gen.steps == steps  # idle: nothing left to iterate


async def test_a_failed_step_fails_the_jobs_in_flight_and_the_loop_goes_on() -> None:
    with generator_loop() as (loop, gen):
        jobs = [submit(loop, 10_000) for _ in range(3)]
        await eventually(lambda: gen.steps >= 2)
        gen.fail_next = True
        for job in jobs:
            with pytest.raises(EngineError, match="illegal memory access"):
                await collect(job)
        assert sorted(gen.cancelled) == [1, 2, 3]
        after = await collect(submit(loop, 4))
    assert sum(c.tokens for c in after) == 4


async def test_a_refused_job_fails_alone() -> None:
    with generator_loop() as (loop, _):
        good, bad = submit(loop, 5), submit(loop, 0)
        with pytest.raises(EngineError, match="max_new_tokens must be positive"):
            await collect(bad)
        assert sum(c.tokens for c in await collect(good)) == 5


async def test_stop_cancels_what_is_in_flight() -> None:
    with generator_loop() as (loop, gen):
        jobs = [submit(loop, 10_000) for _ in range(2)]
        await eventually(lambda: gen.steps >= 2)
        await asyncio.to_thread(loop.stop)
        results = await asyncio.gather(*(collect(j) for j in jobs))
    assert [r[-1].finish_reason for r in results] == ["cancelled", "cancelled"]
    assert sorted(gen.cancelled) == [1, 2]


@pytest.mark.parametrize(
    ("knobs", "tokens"),
    [
        ({}, [0, 0, 0, 0, 0, 0]),
        ({"logit_bias": ((3, 5.0),)}, [3, 3, 3, 3, 3, 3]),
        # each token once: the prompt's three 0s do not count (OpenAI's rule), so 0 comes first
        ({"presence_penalty": 2.0}, [0, 1, 2, 3, 4, 5]),
        ({"frequency_penalty": 1.0}, [0, 1, 2, 3, 4, 5]),
        # frequency adds up: the biased 3 comes back until three uses cost more than its bias
        ({"frequency_penalty": 1.0, "logit_bias": ((3, 2.5),)}, [3, 3, 3, 0, 1, 2]),
        ({"presence_penalty": -1.0, "logit_bias": ((3, -0.5),)}, [0, 0, 0, 0, 0, 0]),
    ],
)
async def test_completion_penalties_reach_the_next_step(
    knobs: dict[str, Any], tokens: list[int]
) -> None:
    with generator_loop() as (loop, _):
        chunks = await collect(submit(loop, 6, **knobs))
    assert "".join(c.text for c in chunks) == "".join(f"<{t}>" for t in tokens)


async def test_a_job_whose_penalty_fails_fails_alone() -> None:
    def make(prompt: torch.Tensor, params: SamplingParams, key: int) -> ScriptedJob:
        job = make_job(prompt, params, key)
        if params.presence_penalty:
            job.gen_settings.token_bias = None  # as if exllamav2 had dropped the tensor
        return job

    gen = ScriptedGenerator(16)
    loop = GeneratorLoop(gen, make, name="exl2-test")
    loop.start()
    try:
        good, bad = submit(loop, 5), submit(loop, 5, presence_penalty=1.0)
        with pytest.raises(EngineError, match="AttributeError"):
            await collect(bad)
        assert sum(c.tokens for c in await collect(good)) == 5
    finally:
        loop.stop()
    assert gen.cancelled == [2]


# ---- logprobs ----


@pytest.mark.parametrize(
    ("knobs", "options"),
    [
        ({}, {}),  # not asked: nothing extra per token
        ({"logprobs": 0}, {"return_probs": True, "return_top_tokens": 0}),
        ({"logprobs": 5, "top_p": 0.9}, {"return_probs": True, "return_top_tokens": 5}),
        # greedy: exllamav2's probabilities are a point mass (top_k 1); its logits are not
        ({"logprobs": 3, "temperature": 0}, {"return_logits": True}),
    ],
)
def test_job_options(knobs: dict[str, Any], options: dict[str, Any]) -> None:
    assert job_options(SamplingParams(max_tokens=4, **knobs)) == options


def named(token: int, logprob: float) -> TokenLogprob:
    return TokenLogprob(token=f"<{token}>", utf8=f"<{token}>".encode(), logprob=logprob)


def test_sampled_results_map_probabilities_to_logprobs() -> None:
    result = {
        "token_ids": torch.tensor([[2, 5]]),
        "token_probs": torch.tensor([[0.5, 1.0]]),
        # past its candidates exllamav2 fills the top k with made-up ids of probability 0
        "top_k_tokens": torch.tensor([[[2, 1, 0], [5, 0, 1]]]),
        "top_k_probs": torch.tensor([[[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]]),
    }
    steps = result_logprobs(result, 3, VOCAB, describe)
    assert steps == (
        StepLogprobs(
            chosen=named(2, math.log(0.5)),
            top=(named(2, math.log(0.5)), named(1, math.log(0.25)), named(0, math.log(0.25))),
        ),
        StepLogprobs(
            chosen=named(5, 0.0), top=(named(5, 0.0), named(0, -math.inf), named(1, -math.inf))
        ),
    )
    just_sampled = {k: v for k, v in result.items() if not k.startswith("top_k")}
    assert [s.top for s in result_logprobs(just_sampled, 0, VOCAB, describe)] == [(), ()]
    assert result_logprobs({"text": "held back"}, 3, VOCAB, describe) == ()


def test_greedy_results_are_the_log_softmax_of_the_logits_without_padding() -> None:
    logits = [0.3, 2.0, -1.0, 0.7, 2.5, 0.0, 1.5, -3.0]
    padded = torch.tensor([logits + [50.0] * PADDING]).view(1, 1, -1).repeat(1, 2, 1)
    result = {"token_ids": torch.tensor([[4, 1]]), "logits": padded}
    steps = result_logprobs(result, 2, VOCAB, describe)
    want = logprobs.distribution(logits, 0.0)
    for got, token in zip(steps, (4, 1), strict=True):
        assert got.chosen.token == f"<{token}>"
        assert math.isclose(got.chosen.logprob, want[token], abs_tol=1e-6)
        assert [t.token for t in got.top] == ["<4>", "<1>"]
        assert [round(t.logprob, 5) for t in got.top] == [round(want[4], 5), round(want[1], 5)]


async def test_the_loop_attaches_each_results_logprobs() -> None:
    bias = ((3, 2.0), (6, 1.0))
    with generator_loop() as (loop, _):
        sampled = await collect(submit(loop, 3, logprobs=2, logit_bias=bias))
        greedy = await collect(submit(loop, 3, logprobs=2, logit_bias=bias, temperature=0))
        plain = await collect(submit(loop, 3, logit_bias=bias))
    weights = [math.exp(2.0), math.exp(1.0)] + [1.0] * (VOCAB - 2)
    three, six = (math.log(w / sum(weights)) for w in weights[:2])
    for chunks in (sampled, greedy):
        steps = [s for c in chunks for s in c.logprobs]
        assert len(steps) == 3
        for s in steps:
            assert s.chosen.token == "<3>"
            assert math.isclose(s.chosen.logprob, three, abs_tol=1e-6)
            assert [t.token for t in s.top] == ["<3>", "<6>"]
            assert math.isclose(s.top[1].logprob, six, abs_tol=1e-6)
    assert all(c.logprobs == () for c in plain)
    assert [c.text for c in plain] == [c.text for c in sampled]


async def test_unreadable_logprobs_fail_that_job_alone() -> None:
    def make(prompt: torch.Tensor, params: SamplingParams, key: int) -> ScriptedJob:
        job = make_job(prompt, params, key)
        if params.logprobs is not None:
            job.options = {}  # as if a release stopped returning what was asked
        return job

    gen = ScriptedGenerator(16)
    loop = GeneratorLoop(gen, make, name="exl2-test", describe=describe, vocab_size=VOCAB)
    loop.start()
    try:
        good, bad = submit(loop, 5), submit(loop, 5, logprobs=1)
        with pytest.raises(EngineError, match="KeyError"):
            await collect(bad)
        assert sum(c.tokens for c in await collect(good)) == 5
    finally:
        loop.stop()
    assert gen.cancelled == [2]


def _ended(reason: str, **extra: Any) -> dict[str, Any]:
    """A job's last result as exllamav2 0.3.2 emits it (text "" on a stop token: it holds its
    text back, with the token's own piece, under "held")."""
    return {"stage": "streaming", "eos": True, "eos_reason": reason, "new_tokens": 3, **extra}


@pytest.mark.parametrize(
    ("result", "kept"),
    [
        (_ended("stop_string", text="a", eos_triggering_string="END"), "aEND"),
        (_ended("stop_token", text="", held={"text": "ab<x>"}, eos_triggering_token_id=7), "ab<x>"),
        (_ended("stop_token", text=""), ""),  # nothing held
        (_ended("max_new_tokens", text="z"), "z"),
    ],
)
def test_include_stop_str_keeps_what_ended_the_job(result: dict[str, Any], kept: str) -> None:
    chunk, _ = chunk_for(result, 0, include_stop=True)
    assert chunk is not None
    assert chunk.text == kept
    plain, _ = chunk_for(result, 0)
    assert plain is not None
    assert plain.text == result["text"]  # without it: what exllamav2 emitted, as before
