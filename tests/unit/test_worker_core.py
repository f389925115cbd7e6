"""The worker's pure decisions: its spec, its heartbeat and rates, a request's prompt blocks, and
how one request is shaped (tables)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from schemas import codec
from schemas.inference import ChatCompletionRequest, CompletionRequest
from schemas.prefix import PromptFields, block_hashes, prompt_text
from schemas.registry import WorkerRecord, WorkerStatus
from services.admission.core import Admission, AdmissionLimits, Busy
from services.common.errors import ApiError
from services.worker import choices, core, shaping
from services.worker.engines import grammar
from services.worker.engines.params import EngineLimits, SamplingParams

S = WorkerStatus
LIMITS = EngineLimits(max_batch=4, max_context=100)
VOCAB = 50


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.convert(body, ChatCompletionRequest)


def text(**fields: Any) -> CompletionRequest:
    return msgspec.convert({"model": "m", "prompt": "hi", **fields}, CompletionRequest)


def refusal(code: str, param: str | None) -> tuple[int, str, str | None]:
    return 400, code, param


# ---- spec and record ----


def test_spec_carries_each_models_slots_and_their_sum() -> None:
    spec = core.worker_spec("http://w:1", {"a": 3, "b": 1}, {"zone": "x"})
    assert spec.models == ("a", "b")
    assert spec.model_slots == {"a": 3, "b": 1}
    assert spec.max_running_requests == 4
    assert spec.labels == {"zone": "x"}


def test_a_record_written_from_our_spec_needs_no_repair() -> None:
    spec = core.worker_spec("http://w:1", {"a": 3, "b": 1}, {"zone": "x"})
    fields = msgspec.structs.asdict(spec)
    record = WorkerRecord(id="w1", status=S.READY, revision=1, owner="worker", **fields)
    assert core.spec_of(record) == spec
    assert core.repair(record, spec, S.READY) is None
    grown = core.worker_spec("http://w:1", {"a": 4, "b": 1}, {"zone": "x"})
    assert core.repair(record, grown, S.READY) == "replace"


# ---- heartbeat and /health ----


def admissions() -> dict[str, Admission]:
    a = Admission(AdmissionLimits(max_in_flight=1, max_queue_depth=5, max_wait_s=9.0))
    b = Admission(AdmissionLimits(max_in_flight=2, max_queue_depth=0, max_wait_s=9.0))
    a.request(now=0.0)
    a.request(now=0.0)  # queued behind the first
    b.request(now=0.0)
    return {"a": a, "b": b}


def test_heartbeat_reports_every_models_load() -> None:
    cores = admissions()
    load = core.worker_load("w1", "http://w:1", S.READY, 0.5, cores)
    assert (load.worker_id, load.url, load.status, load.heartbeat_interval_s) == (
        "w1",
        "http://w:1",
        S.READY,
        0.5,
    )
    got = [(m.id, m.in_flight, m.queue_depth, m.max_in_flight) for m in load.models]
    assert got == [("a", 1, 1, 1), ("b", 1, 0, 2)]
    assert core.slots(cores) == {"a": 1, "b": 2}
    assert core.backlog(cores) == 3


def test_health_is_the_heartbeats_numbers_and_503_once_draining() -> None:
    cores = admissions()
    status, body = core.health(cores)
    assert (status, body.status, body.models) == (200, "ready", core.model_loads(cores))
    cores["b"].draining = True
    status, body = core.health(cores)
    assert (status, body.status) == (503, "draining")


# ---- measured rates ----

EWMAS: list[tuple[str, float, list[float], float | None]] = [
    # (case, weight, samples, mean)
    ("nothing measured", 0.2, [], None),
    ("the first sample is the mean", 0.2, [3.0], 3.0),
    ("then each moves it by the weight", 0.5, [4.0, 2.0], 3.0),
    ("weight 0.25", 0.25, [8.0, 0.0, 0.0], 4.5),
    ("weight 1: the last sample", 1.0, [8.0, 1.0], 1.0),
    ("a steady rate stays", 0.2, [2.0] * 5, 2.0),
]


@pytest.mark.parametrize(
    ("weight", "samples", "mean"), [c[1:] for c in EWMAS], ids=[c[0] for c in EWMAS]
)
def test_ewma(weight: float, samples: list[float], mean: float | None) -> None:
    ewma = core.Ewma(weight)
    for sample in samples:
        ewma.add(sample)
    assert ewma.value == pytest.approx(mean) if mean is not None else ewma.value is None


@pytest.mark.parametrize("weight", [0.0, -0.1, 1.5])
def test_an_ewma_weight_is_a_share(weight: float) -> None:
    with pytest.raises(ValueError, match="EWMA weight"):
        core.Ewma(weight)


def m(
    held: float | None,
    ttft: float | None,
    prompt: int,
    cached: int = 0,
    blocks: int = 0,
    hits: int = 0,
) -> core.Measured:
    return core.Measured(
        held_s=held,
        ttft_s=ttft,
        prompt_tokens=prompt,
        cached_tokens=cached,
        prefix_blocks=blocks,
        prefix_hits=hits,
    )


STATS: list[tuple[str, list[core.Measured], tuple[float | None, float | None, int, int]]] = [
    # (case, requests measured (weight 0.5), (service_s, prefill_tokens_per_s, lookups, hits))
    ("nothing finished", [], (None, None, 0, 0)),
    ("one request", [m(2.0, 0.5, 100)], (2.0, 200.0, 0, 0)),
    ("two: recent means", [m(2.0, 0.5, 100), m(4.0, 1.0, 400)], (3.0, 300.0, 0, 0)),
    ("a client that left: no slot time", [m(None, 0.5, 100)], (None, 200.0, 0, 0)),
    ("no first token: no prefill rate", [m(1.0, None, 100)], (1.0, None, 0, 0)),
    ("an empty prompt: no prefill rate", [m(1.0, 0.1, 0)], (1.0, None, 0, 0)),
    ("cached tokens were not prefilled", [m(1.0, 0.5, 200, 100, 5, 3)], (1.0, 200.0, 5, 3)),
    ("all cached: no rate, hits count", [m(1.0, 0.1, 100, 100, 4, 4)], (1.0, None, 4, 4)),
    (
        "lookups and hits add up",
        [m(1.0, 0.1, 90, 0, 4), m(1.0, 0.1, 90, 0, 4, 2)],
        (1.0, 900.0, 8, 2),
    ),
    ("a short prompt is overhead, not a rate sample", [m(1.0, 0.02, 2)], (1.0, None, 0, 0)),
    ("under a block prefilled: no sample", [m(1.0, 0.1, 100, 40)], (1.0, None, 0, 0)),
]


@pytest.mark.parametrize(
    ("requests", "reported"), [c[1:] for c in STATS], ids=[c[0] for c in STATS]
)
def test_model_stats(
    requests: list[core.Measured], reported: tuple[float | None, float | None, int, int]
) -> None:
    stats = core.ModelStats(weight=0.5)
    for measured in requests:
        stats.add(measured)
    load = stats.report(admissions()["a"].load("a"))
    assert (load.service_s, load.prefill_tokens_per_s, load.prefix_lookups, load.prefix_hits) == (
        pytest.approx(reported[0]) if reported[0] is not None else None,
        pytest.approx(reported[1]) if reported[1] is not None else None,
        reported[2],
        reported[3],
    )
    assert (load.id, load.in_flight, load.queue_depth) == ("a", 1, 1)  # the admission's numbers


def test_heartbeat_and_health_carry_each_models_rates() -> None:
    cores, stats = admissions(), {"a": core.ModelStats()}
    stats["a"].add(core.Measured(held_s=2.0, ttft_s=0.5, prompt_tokens=100, prefix_blocks=3))
    load = core.worker_load("w1", "http://w:1", S.READY, 0.5, cores, stats)
    got = [(m.id, m.service_s, m.prefill_tokens_per_s, m.prefix_lookups) for m in load.models]
    assert got == [("a", 2.0, 200.0, 3), ("b", None, None, 0)]  # b: nothing measured
    _, body = core.health(cores, stats)
    assert body.models == load.models


# ---- a request's prompt blocks ----

SYSTEM = "You are a careful assistant. " * 40  # ~1.2 KB: four full blocks


def said(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [said("system", SYSTEM), said("user", "hi")]},
        {"messages": [said("user", [{"type": "text", "text": SYSTEM}])]},
        {"prompt": SYSTEM},
        {"prompt": [SYSTEM]},
        {"messages": [said("user", "short")]},
    ],
    ids=["chat", "text parts", "prompt", "one-prompt list", "shorter than a block"],
)
def test_prompt_blocks_are_the_ones_the_router_names(body: dict[str, Any]) -> None:
    raw = codec.encode({"model": "m", **body})
    req: ChatCompletionRequest | CompletionRequest
    if "messages" in body:
        req = codec.decode(raw, ChatCompletionRequest)
    else:
        req = codec.decode(raw, CompletionRequest)
    assert core.prompt_blocks(req) == block_hashes(prompt_text(codec.decode(raw, PromptFields)))
    assert len(core.prompt_blocks(req)) == (0 if "short" in str(body) else 4)


# ---- shaping one request ----

NULLABLE = (
    "temperature",
    "top_p",
    "top_k",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stream",
    "stream_options",
    "min_p",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
)
CHOSEN = "structured_outputs"

SHAPES: list[tuple[str, Any, int, int, tuple[int, str, str | None] | SamplingParams]] = [
    # (case, request, prompt tokens, default_max_tokens, refusal or the params it becomes)
    ("no max_tokens: the rest of the context", chat(), 10, 0, SamplingParams(max_tokens=90)),
    ("a configured default caps it", chat(), 10, 5, SamplingParams(max_tokens=5)),
    ("the default never passes the context", chat(), 98, 5, SamplingParams(max_tokens=2)),
    ("max_tokens as asked", chat(max_tokens=7), 10, 5, SamplingParams(max_tokens=7)),
    (
        "max_completion_tokens wins over max_tokens",
        chat(max_tokens=7, max_completion_tokens=3),
        10,
        0,
        SamplingParams(max_tokens=3),
    ),
    ("the whole room", text(max_tokens=90), 10, 0, SamplingParams(max_tokens=90)),
    (
        "one token past the room",
        text(max_tokens=91),
        10,
        0,
        refusal("context_length_exceeded", "max_tokens"),
    ),
    ("chat prompt fills it", chat(), 100, 0, refusal("context_length_exceeded", "messages")),
    (
        "text prompt fills it",
        text(max_tokens=1),
        120,
        0,
        refusal("context_length_exceeded", "prompt"),
    ),
    (
        "sampling knobs, stops and penalties pass through",
        chat(
            max_tokens=4,
            temperature=0.5,
            top_p=0.9,
            top_k=3,
            seed=7,
            stop="END",
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            repetition_penalty=1.2,
        ),
        10,
        0,
        SamplingParams(
            max_tokens=4,
            temperature=0.5,
            top_p=0.9,
            top_k=3,
            seed=7,
            stop=("END",),
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            repetition_penalty=1.2,
        ),
    ),
    (
        "logit_bias becomes sorted (id, bias) pairs",
        chat(max_tokens=1, logit_bias={"9": 1.0, "2": -100.0}),
        10,
        0,
        SamplingParams(max_tokens=1, logit_bias=((2, -100.0), (9, 1.0))),
    ),
    (
        "a logit_bias key past the vocabulary",
        chat(max_tokens=1, logit_bias={str(VOCAB): 1.0}),
        10,
        0,
        refusal("invalid_value", "logit_bias"),
    ),
    (
        "chat logprobs: the sampled token's",
        chat(logprobs=True),
        10,
        0,
        SamplingParams(max_tokens=90, logprobs=0),
    ),
    (
        "chat top_logprobs: the alternatives too",
        chat(logprobs=True, top_logprobs=20),
        10,
        0,
        SamplingParams(max_tokens=90, logprobs=20),
    ),
    (
        "the neutral values ask for none",
        chat(logprobs=False, top_logprobs=0),
        10,
        0,
        SamplingParams(max_tokens=90),
    ),
    (
        "top_logprobs without logprobs",
        chat(top_logprobs=2),
        10,
        0,
        refusal("invalid_value", "top_logprobs"),
    ),
    (
        "completions logprobs 0: the sampled token's",
        text(logprobs=0),
        10,
        0,
        SamplingParams(max_tokens=90, logprobs=0),
    ),
    (
        "completions logprobs 5",
        text(logprobs=5, n=3),
        10,
        0,
        SamplingParams(max_tokens=90, logprobs=5),
    ),
    (
        "a logit_bias key that is no number",
        text(max_tokens=1, logit_bias={"x": 1.0}),
        10,
        0,
        refusal("invalid_value", "logit_bias"),
    ),
    (
        "null is the default (OpenAI's meaning; the official client sends None as null)",
        chat(**dict.fromkeys(NULLABLE), max_tokens=3),
        10,
        0,
        SamplingParams(max_tokens=3),
    ),
    (
        "vLLM's min_p, min_tokens, ignore_eos, stop_token_ids",
        text(max_tokens=5, min_p=0.2, min_tokens=3, ignore_eos=True, stop_token_ids=[4, 1]),
        10,
        0,
        SamplingParams(
            max_tokens=5, min_p=0.2, min_tokens=3, ignore_eos=True, stop_token_ids=(4, 1)
        ),
    ),
    (
        "a stop token id past the vocabulary",
        chat(max_tokens=1, stop_token_ids=[1, VOCAB]),
        10,
        0,
        refusal("invalid_value", "stop_token_ids"),
    ),
    (
        "min_tokens past max_tokens",
        chat(max_tokens=2, min_tokens=3),
        10,
        0,
        refusal("invalid_value", "min_tokens"),
    ),
    (
        "min_tokens past the default max_tokens (the context's rest)",
        chat(min_tokens=91),
        10,
        0,
        refusal("invalid_value", "min_tokens"),
    ),
    (
        "min_tokens when every token would stop",
        chat(max_tokens=2, min_tokens=1, stop_token_ids=list(range(VOCAB))),
        10,
        0,
        refusal("invalid_value", "min_tokens"),
    ),
    (
        "min_tokens with stop strings (vLLM and exllamav2 disagree)",
        chat(max_tokens=4, min_tokens=1, stop="x"),
        10,
        0,
        refusal("unsupported_parameter", "min_tokens"),
    ),
    (
        "min_tokens with a grammar (its end cannot wait)",
        chat(max_tokens=4, min_tokens=1, guided_regex="a+"),
        10,
        0,
        refusal("unsupported_parameter", "min_tokens"),
    ),
    (
        "completions' response_format (vLLM serves it there)",
        text(max_tokens=4, response_format={"type": "json_object"}),
        10,
        0,
        SamplingParams(max_tokens=4, constraint=grammar.json_object()),
    ),
    (
        "structured_outputs: guided_*'s successor",
        chat(max_tokens=4, structured_outputs={"choice": ["yes", "no"]}),
        10,
        0,
        SamplingParams(max_tokens=4, constraint=grammar.choice(["yes", "no"], CHOSEN)),
    ),
    (
        "structured_outputs and guided_* together",
        chat(max_tokens=4, structured_outputs={"regex": "a"}, guided_regex="a"),
        10,
        0,
        refusal("invalid_value", "structured_outputs"),
    ),
]


@pytest.mark.parametrize(
    ("req", "prompt_tokens", "default", "expected"),
    [c[1:] for c in SHAPES],
    ids=[c[0] for c in SHAPES],
)
def test_sampling(
    req: Any,
    prompt_tokens: int,
    default: int,
    expected: tuple[int, str, str | None] | SamplingParams,
) -> None:
    got = shaping.sampling(req, prompt_tokens, LIMITS, VOCAB, default)
    if isinstance(got, ApiError):
        assert got.type == "invalid_request_error"
        assert (got.status, got.code, got.param) == expected, got.message
    else:
        assert got == expected


WEATHER = {"type": "function", "function": {"name": "weather"}}
UNCONSTRAINED = EngineLimits(max_batch=4, max_context=100, constrains_output=False)


@pytest.mark.parametrize(
    ("req", "param"),
    [
        (chat(max_tokens=2, response_format={"type": "json_object"}), "response_format"),
        (text(max_tokens=2, guided_choice=["a", "b"]), "guided_choice"),
        (chat(max_tokens=2, structured_outputs={"regex": "a+"}), "structured_outputs"),
        (chat(max_tokens=2, tools=[WEATHER], tool_choice="required"), "tool_choice"),
        (chat(max_tokens=2, tools=[WEATHER], tool_choice={"type": "function"}), "tool_choice"),
        # nothing to constrain: served
        (chat(max_tokens=2, response_format={"type": "text"}), None),
        (chat(max_tokens=2, tools=[WEATHER], tool_choice="auto"), None),
        (chat(max_tokens=2, tools=[WEATHER]), None),
        (chat(max_tokens=2, tool_choice="required"), None),  # no tools: tools.plan refuses it
    ],
)
def test_a_model_that_cannot_constrain_refuses_constraints_by_name(
    req: Any, param: str | None
) -> None:
    """An exllamav2 checkpoint without tokenizer.json: a 400 up front, never a failed job."""
    got = shaping.sampling(req, 10, UNCONSTRAINED, VOCAB)
    if param is None:
        assert isinstance(got, SamplingParams)
    else:
        assert isinstance(got, ApiError)
        assert (got.status, got.code, got.param) == (400, "unsupported_parameter", param)
        assert isinstance(shaping.sampling(req, 10, LIMITS, VOCAB), SamplingParams)


@pytest.mark.parametrize(
    ("req", "max_in_flight", "expected"),
    [
        (chat(), 1, 1),
        (chat(n=8), 8, 8),
        (text(n=2, stream=True), 2, 2),
        (chat(n=9), 16, "n"),  # past the worker's max_n (8)
        (chat(n=3), 2, "n"),  # past the model's slots: never admitted
        (text(best_of=3), 4, 3),  # three candidates, the likeliest answered
        (text(best_of=2, n=2, stream=True), 4, 2),  # best_of = n: nothing to choose, streams
        (text(best_of=2, n=3), 4, "best_of"),  # fewer candidates than answers
        (text(best_of=3, stream=True), 4, "best_of"),  # the best are known only at the end
        (text(best_of=9), 16, "best_of"),
        (text(best_of=4, n=2), 3, "best_of"),
        (chat(n=None, stream=None), 1, 1),  # null: the defaults
        (text(best_of=2, n=None, stream=None), 2, 2),
    ],
)
def test_candidates(req: Any, max_in_flight: int, expected: int | str) -> None:
    got = choices.candidates(req, 8, max_in_flight)
    if isinstance(expected, int):
        assert got == expected
    else:
        assert isinstance(got, ApiError)
        assert (got.status, got.code, got.param) == (400, "invalid_value", expected), got.message


def test_best_of_candidates_carry_the_logprobs_they_are_ranked_by() -> None:
    assert choices.ranked(SamplingParams(max_tokens=1)).logprobs == 0
    assert choices.ranked(SamplingParams(max_tokens=1, logprobs=3)).logprobs == 3


def test_each_choice_has_its_own_seed() -> None:
    seeded = SamplingParams(max_tokens=4, seed=41, logprobs=2)
    seeds = [choices.choice_params(seeded, i).seed for i in range(3)]
    assert seeds == [41, 42, 43]
    assert choices.choice_params(seeded, 2) == msgspec.structs.replace(seeded, seed=43)
    unseeded = SamplingParams(max_tokens=4)
    assert [choices.choice_params(unseeded, i) for i in range(3)] == [unseeded] * 3


def test_schema_bounds_logprobs_and_n() -> None:
    chat_cases: list[tuple[dict[str, Any], str]] = [
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"logprobs": 1}, "logprobs"),  # chat's is a bool
    ]
    for body, param in chat_cases:
        with pytest.raises(msgspec.ValidationError, match=param):
            chat(**body)
    text_cases: list[tuple[dict[str, Any], str]] = [
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
    ]
    for body, param in text_cases:
        with pytest.raises(msgspec.ValidationError, match=param):
            text(**body)


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}


def parts(*content: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": "look"}, *content]}


CONTENT: list[tuple[str, list[dict[str, Any]], bool, str | None]] = [
    ("plain text", [{"role": "user", "content": "hi"}], False, None),
    ("text parts", [parts()], False, None),
    ("an image to a text model", [parts(IMAGE)], False, "messages[0].content[1]"),
    ("an image to a model that takes them", [parts(IMAGE)], True, None),
    ("audio, in the second message", [parts(), parts(AUDIO)], True, "messages[1].content[1]"),
]


@pytest.mark.parametrize(
    ("messages", "images", "param"), [c[1:] for c in CONTENT], ids=[c[0] for c in CONTENT]
)
def test_refused_content(messages: list[dict[str, Any]], images: bool, param: str | None) -> None:
    err = shaping.refused_content(chat(messages=messages), images)
    if param is None:
        assert err is None
    else:
        assert err is not None
        assert (err.status, err.code, err.param) == (400, "unsupported_content", param)


@pytest.mark.parametrize(
    ("req", "param"),
    [
        (chat(logprobs=False, presence_penalty=0), None),
        (chat(logprobs=True, top_logprobs=3, n=4), None),
        (text(logprobs=0), None),
        (text(best_of=2), None),
        (chat(tools=[{"type": "function"}]), None),  # served (#18): the tools module judges it
        (chat(functions=[{"name": "f"}]), "functions"),
        (text(echo=True), "echo"),
        (text(echo=None, suffix=None), None),
        (chat(moderation=None), None),
        (chat(moderation={"model": "omni-moderation-latest"}), "moderation"),
        # vLLM's extensions no engine here has: their neutral values are served
        (chat(bad_words=[], prompt_logprobs=None, use_beam_search=False), None),
        (chat(bad_words=["fleet"]), "bad_words"),
        (text(prompt_logprobs=0), "prompt_logprobs"),  # 0: the prompt's own logprobs
        (text(use_beam_search=True), "use_beam_search"),
    ],
)
def test_unsupported_is_refused_by_name(req: Any, param: str | None) -> None:
    err = shaping.unsupported(req)
    if param is None:
        assert err is None
    else:
        assert err is not None
        assert (err.status, err.code, err.param) == (400, "unsupported_parameter", param)


@pytest.mark.parametrize(
    ("reason", "words"),
    [("queue_full", "queue is full"), ("timeout", "no slot freed in time"), ("draining", "")],
)
def test_busy_is_the_one_503(reason: Any, words: str) -> None:
    err = core.busy("m", Busy(reason, 7))
    assert (err.status, err.type, err.code, err.param, err.retry_after_s) == (
        503,
        "service_unavailable_error",
        "rate_limit_exceeded",
        None,
        7,
    )
    assert words in err.message
    assert "worker is at capacity" in err.message


def test_not_served_names_what_is() -> None:
    err = core.not_served("x", ["b", "a"])
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert "(serving: a, b)" in err.message
