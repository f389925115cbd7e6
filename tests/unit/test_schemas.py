"""Wire schemas: round trips, golden JSON for every event, and schema evolution."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from schemas import codec
from schemas.base import Envelope, WireStruct
from schemas.capacity import CapacitySource, CapacityView, ModelCapacity
from schemas.dashboard import DashboardWorker, FleetSnapshot, GatewayLoad
from schemas.errors import ErrorBody, ErrorEnvelope
from schemas.inference import ChatCompletionRequest, CompletionRequest
from schemas.load import ModelLoad, WorkerLoad
from schemas.registry import (
    CommandError,
    CommandOk,
    CommandReply,
    GetRequest,
    RegisterRequest,
    RegistryBeacon,
    RegistryEvent,
    RegistrySnapshot,
    ReplaceRequest,
    SetStatusRequest,
    WorkerRecord,
    WorkerRegistered,
    WorkerRemoved,
    WorkerReplaced,
    WorkerSpec,
    WorkerStatus,
    WorkerStatusChanged,
)

REC = WorkerRecord(
    id="w1",
    url="http://10.0.0.5:8000",
    models=("llama-3-8b",),
    status=WorkerStatus.READY,
    revision=2,
    max_running_requests=256,
    model_slots={"llama-3-8b": 256},
    labels={"zone": "a"},
    registered_at=1700000000.5,
)
REC_JSON = (
    '{"id":"w1","url":"http://10.0.0.5:8000","models":["llama-3-8b"],"status":"ready",'
    '"revision":2,"max_running_requests":256,"model_slots":{"llama-3-8b":256},"labels":{"zone":"a"},'
    '"registered_at":1700000000.5,"owner":""}'
)
REC2 = msgspec.structs.replace(
    REC, url="http://10.0.0.6:8000", models=("m2",), model_slots={"m2": 256}, revision=3
)
REC2_JSON = REC_JSON.replace("10.0.0.5", "10.0.0.6").replace('"llama-3-8b"', '"m2"')
REC2_JSON = REC2_JSON.replace('"revision":2', '"revision":3')

ENV = '{"source":"registry","epoch":1,"seq":3,"sent_at":1700000001.0,"body":%s}'

GOLDEN: list[tuple[Any, str]] = [
    (WorkerRegistered(worker=REC), f'{{"type":"worker.registered","worker":{REC_JSON}}}'),
    (
        WorkerReplaced(old=REC, new=REC2),
        f'{{"type":"worker.replaced","old":{REC_JSON},"new":{REC2_JSON}}}',
    ),
    (
        WorkerStatusChanged(
            worker_id="w1",
            old_status=WorkerStatus.PENDING,
            new_status=WorkerStatus.READY,
            revision=2,
            reason="heartbeat",
            worker=REC,
        ),
        '{"type":"worker.status_changed","worker_id":"w1","old_status":"pending",'
        f'"new_status":"ready","revision":2,"reason":"heartbeat","worker":{REC_JSON}}}',
    ),
    (
        WorkerRemoved(worker=REC, reason="admin"),
        f'{{"type":"worker.removed","worker":{REC_JSON},"reason":"admin"}}',
    ),
    (RegistryBeacon(last_seq=9, workers=1), '{"type":"registry.beacon","last_seq":9,"workers":1}'),
]


@pytest.mark.parametrize(("body", "body_json"), GOLDEN, ids=lambda v: v.__class__.__name__)
def test_registry_event_golden_json(body: RegistryEvent, body_json: str) -> None:
    env = Envelope(source="registry", epoch=1, seq=3, sent_at=1700000001.0, body=body)
    assert codec.encode(env).decode() == ENV % body_json
    assert codec.registry_event_decoder.decode((ENV % body_json).encode()) == env


GOLDEN_OTHER: list[tuple[WireStruct, str, Any]] = [
    (
        WorkerLoad(
            worker_id="w1",
            url="http://10.0.0.5:8000",
            models=(
                ModelLoad(id="m", in_flight=1, queue_depth=0, max_in_flight=4, max_queue_depth=8),
            ),
            status=WorkerStatus.READY,
        ),
        '{"worker_id":"w1","url":"http://10.0.0.5:8000","models":[{"id":"m","in_flight":1,'
        '"queue_depth":0,"max_in_flight":4,"max_queue_depth":8,"service_s":null,'
        '"prefill_tokens_per_s":null,"prefix_lookups":0,"prefix_hits":0}],"status":"ready",'
        '"tokens_per_s":null,"heartbeat_interval_s":1.0}',
        WorkerLoad,
    ),
    (
        CapacityView(
            fleet=ModelCapacity(capacity=320, source=CapacitySource.MIXED, workers_available=2),
            models={
                "m": ModelCapacity(capacity=64, source=CapacitySource.MIXED, workers_available=1)
            },
            registry_epoch=5,
            registry_seq=9,
        ),
        '{"fleet":{"capacity":320,"source":"mixed","workers_available":2},"models":{"m":'
        '{"capacity":64,"source":"mixed","workers_available":1}},"registry_epoch":5,'
        '"registry_seq":9}',
        CapacityView,
    ),
    (
        CommandError(code="conflict", message="url taken", field="url"),
        '{"result":"error","code":"conflict","message":"url taken","field":"url"}',
        CommandReply,
    ),
    (
        CommandOk(worker=REC),
        f'{{"result":"ok","worker":{REC_JSON},"workers":[],"applied":true}}',
        CommandReply,
    ),
    (
        ErrorEnvelope(error=ErrorBody(message="no", type="invalid_request_error", code="x")),
        '{"error":{"message":"no","type":"invalid_request_error","code":"x","param":null}}',
        ErrorEnvelope,
    ),
    (
        RegistrySnapshot(epoch=5, seq=9, workers=(REC,), heard_at={"w-1": 12.5}),
        f'{{"epoch":5,"seq":9,"workers":[{REC_JSON}],"heard_at":{{"w-1":12.5}}}}',
        RegistrySnapshot,
    ),
    (
        FleetSnapshot(
            workers=(
                DashboardWorker(
                    id="w1",
                    url="http://10.0.0.5:8000",
                    status=WorkerStatus.NOT_READY,
                    models=("m",),
                    heartbeat_age_s=4.2,
                ),
            ),
            capacity=None,
            gateway={"m": GatewayLoad(in_flight=2, queue_depth=1, limit=8)},
            registry_epoch=5,
            registry_seq=9,
            generated_at=1.5,
        ),
        '{"workers":[{"id":"w1","url":"http://10.0.0.5:8000","status":"not_ready","models":["m"],'
        '"load":[],"heartbeat_age_s":4.2,"fresh":false,"cooling_down":false}],"capacity":null,'
        '"gateway":{"m":{"in_flight":2,"queue_depth":1,"limit":8}},"registry_epoch":5,'
        '"registry_seq":9,"generated_at":1.5}',
        FleetSnapshot,
    ),
]


@pytest.mark.parametrize(("value", "golden", "type_"), GOLDEN_OTHER, ids=lambda v: type(v).__name__)
def test_other_wire_types_golden_json(value: WireStruct, golden: str, type_: Any) -> None:
    assert codec.encode(value).decode() == golden
    assert codec.decode(golden, type_) == value


@pytest.mark.parametrize(
    "value",
    [
        RegisterRequest(worker=WorkerSpec(url="http://h:1", models=("a", "b"))),
        ReplaceRequest(id="w9", worker=WorkerSpec(url="https://h:2", models=(), labels={"k": "v"})),
        SetStatusRequest(id="w9", status=WorkerStatus.DRAINING, expected_revision=4),
    ],
)
def test_command_round_trip(value: WireStruct) -> None:
    assert codec.decode(codec.encode(value), type(value)) == value


def test_structs_are_frozen() -> None:
    with pytest.raises(AttributeError):
        REC.url = "http://elsewhere:1"  # type: ignore[misc]


def test_a_record_from_before_owners_is_an_operators() -> None:
    old = REC_JSON.replace(',"owner":""', "")
    assert '"owner"' not in old
    assert codec.decode(old.encode(), WorkerRecord) == REC
    assert REC.owner == ""


def test_a_record_from_before_model_slots_has_none() -> None:
    """Records and specs written before per-model slots decode with an empty map (unknown)."""
    old = REC_JSON.replace(',"model_slots":{"llama-3-8b":256}', "")
    assert '"model_slots"' not in old
    assert codec.decode(old.encode(), WorkerRecord) == msgspec.structs.replace(REC, model_slots={})
    spec = codec.decode(b'{"url":"http://h:1","models":["a"]}', WorkerSpec)
    assert spec.model_slots == {}


def test_old_decoder_reads_message_with_new_field() -> None:
    """A newer registry adds a field; a consumer built against today's schema still decodes it."""

    class WorkerRecordV2(WireStruct, frozen=True, kw_only=True):
        id: str
        url: str
        models: tuple[str, ...]
        status: WorkerStatus
        revision: int
        gpu_kind: str = "h100"  # the new field

    class RegisteredV2(
        WireStruct, frozen=True, kw_only=True, tag_field="type", tag="worker.registered"
    ):
        worker: WorkerRecordV2
        region: str = "eu"  # another new field, on the event itself

    new = RegisteredV2(
        worker=WorkerRecordV2(
            id="w1", url="http://h:1", models=("m",), status=WorkerStatus.READY, revision=1
        )
    )
    data = codec.encode(Envelope(source="registry", epoch=1, seq=1, sent_at=0.0, body=new))
    assert b'"gpu_kind":"h100"' in data
    assert b'"region":"eu"' in data
    old = codec.registry_event_decoder.decode(data)
    assert isinstance(old.body, WorkerRegistered)
    assert old.body.worker.id == "w1"
    assert old.body.worker.labels == {}


@pytest.mark.parametrize(
    "bad",
    [
        b"{not json",
        b'{"source":"r","epoch":1,"seq":-1,"sent_at":0,"body":{"type":"registry.beacon","last_seq":0}}',
        b'{"source":"r","epoch":1,"seq":1,"sent_at":0,"body":{"type":"worker.exploded"}}',
        b'{"source":"r","epoch":1,"seq":1,"sent_at":0}',
        # nested past the stack in an unknown field, which msgspec walks to skip it
        b'{"source":"r","x":' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_bad_envelopes_raise_decode_errors(bad: bytes) -> None:
    with pytest.raises(codec.DecodeError):
        codec.registry_event_decoder.decode(bad)


DEEP = 50_000  # a 2 KB body nested 1,000 deep already ran msgspec out of stack


@pytest.mark.parametrize(
    ("data", "type_"),
    [
        (b"[" * DEEP, Any),
        (b"[" * DEEP + b"]" * DEEP, Any),
        (b'{"a":' * DEEP + b"1" + b"}" * DEEP, dict[str, Any]),
        (
            b'{"model":"m","messages":[{"role":"user"}],"tools":' + b"[" * DEEP,
            ChatCompletionRequest,
        ),
        (b'{"model":"m","prompt":"p","x_unknown":' + b'[{"a":' * DEEP, CompletionRequest),
    ],
    ids=["open", "closed", "objects", "known-field", "unknown-field"],
)
def test_nesting_too_deep_is_a_decode_error_naming_it(data: bytes, type_: Any) -> None:
    with pytest.raises(msgspec.DecodeError, match="nested too deeply"):
        codec.decode(data, type_)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"url": "ftp://h:1", "models": []}, "url"),
        ({"url": "http://h:1", "models": ["has space"]}, "models"),
        ({"url": "http://h:1", "models": [], "max_running_requests": 0}, "max_running_requests"),
        (
            {"url": "http://h:1", "models": [], "max_running_requests": 70000},
            "max_running_requests",
        ),
        ({"url": "http://h:1", "models": ["a"], "model_slots": {"a": 0}}, "model_slots"),
        ({"url": "http://h:1", "models": ["a"], "model_slots": {"a": 65536}}, "model_slots"),
        ({"url": "http://h:1", "models": ["a"], "model_slots": {"a b": 8}}, "model_slots"),
        ({"url": "http://h:1", "models": ["a"], "model_slots": {"a": "8"}}, "model_slots"),
    ],
)
def test_worker_spec_validation_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.convert(spec, WorkerSpec)


def test_worker_id_pattern_blocks_subject_breaking_ids() -> None:
    for bad in ["w.1", "w*", "w>", "w 1", "$w", ""]:
        with pytest.raises(msgspec.ValidationError, match="id"):
            msgspec.convert({"id": bad}, type=GetRequest)


CHAT_BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TEXT_BASE: dict[str, Any] = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize(
    ("base", "extra", "param"),
    [
        # the neutral values clients send by default are served
        (CHAT_BASE, {}, None),
        (
            CHAT_BASE,
            {
                "presence_penalty": 0,
                "frequency_penalty": 0.0,
                "logit_bias": {},
                "logprobs": False,
                "top_logprobs": 0,
                "tools": [],
                "tool_choice": "auto",
                "response_format": {"type": "text"},
            },
            None,
        ),
        (CHAT_BASE, {"tool_choice": "none", "functions": None, "logprobs": None}, None),
        (TEXT_BASE, {"echo": False, "best_of": 1, "suffix": "", "logprobs": None}, None),
        # penalties and logit_bias are served (their values are checked elsewhere)
        (
            CHAT_BASE,
            {
                "presence_penalty": 0.5,
                "frequency_penalty": -1,
                "repetition_penalty": 1.2,
                "logit_bias": {"50256": -100},
            },
            None,
        ),
        (TEXT_BASE, {"presence_penalty": 2, "logit_bias": {"7": 100}}, None),
        # served now (#18): logprobs, top_logprobs (the worker checks it comes with logprobs),
        # completions logprobs and best_of
        (CHAT_BASE, {"logprobs": True, "top_logprobs": 3}, None),
        (CHAT_BASE, {"top_logprobs": 3}, None),
        (TEXT_BASE, {"logprobs": 0}, None),
        (TEXT_BASE, {"best_of": 3}, None),
        # served now (#18): tools, tool_choice (checked by the worker's tools module) and
        # structured output (checked by its grammar module)
        (CHAT_BASE, {"tools": [{"type": "function", "function": {"name": "f"}}]}, None),
        (CHAT_BASE, {"tool_choice": "required"}, None),
        (CHAT_BASE, {"tool_choice": {"type": "function", "function": {"name": "f"}}}, None),
        (CHAT_BASE, {"response_format": {"type": "json_object"}}, None),
        # anything that asks for a feature no engine has is named
        (CHAT_BASE, {"functions": [{"name": "f"}]}, "functions"),
        (TEXT_BASE, {"echo": True}, "echo"),
        (TEXT_BASE, {"suffix": "}"}, "suffix"),
        (CHAT_BASE, {"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
        (CHAT_BASE, {"moderation": None}, None),
        # vLLM's extensions: served, or named unless neutral
        (TEXT_BASE, {"min_p": 0.1, "min_tokens": 2, "ignore_eos": True}, None),
        (TEXT_BASE, {"stop_token_ids": [2], "structured_outputs": {"regex": "a"}}, None),
        (TEXT_BASE, {"response_format": {"type": "json_object"}}, None),
        (TEXT_BASE, {"bad_words": [], "use_beam_search": False, "prompt_logprobs": None}, None),
        (TEXT_BASE, {"bad_words": ["x"]}, "bad_words"),
        (CHAT_BASE, {"prompt_logprobs": 0}, "prompt_logprobs"),
        (CHAT_BASE, {"use_beam_search": True}, "use_beam_search"),
    ],
)
def test_unsupported_openai_features_are_named(
    base: dict[str, Any], extra: dict[str, Any], param: str | None
) -> None:
    type_ = ChatCompletionRequest if "messages" in base else CompletionRequest
    req = msgspec.convert({**base, **extra}, type_)
    assert req.unsupported() == param


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias"),
        ({"logit_bias": {"5": -101}}, "logit_bias"),
        ({"logit_bias": {"5": "x"}}, "logit_bias"),
        ({"logit_bias": [5]}, "logit_bias"),
    ],
)
def test_penalties_out_of_range_fail_validation_by_name(extra: dict[str, Any], param: str) -> None:
    for base, type_ in ((CHAT_BASE, ChatCompletionRequest), (TEXT_BASE, CompletionRequest)):
        with pytest.raises(msgspec.ValidationError) as failed:
            codec.decode(codec.encode({**base, **extra}), type_)
        assert codec.error_field(str(failed.value)) == param


@pytest.mark.parametrize(
    "extra",
    [
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"repetition_penalty": 1e-6},
        {"repetition_penalty": 50},
        {"logit_bias": {"0": -100, "5": 100, "x": 0}},  # keys are the worker's to check
    ],
)
def test_penalties_in_range_decode(extra: dict[str, Any]) -> None:
    req = codec.decode(codec.encode({**CHAT_BASE, **extra}), ChatCompletionRequest)
    assert {k: getattr(req, k) for k in extra} == extra


NULLS = [
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
]


def test_null_decodes_as_not_sent() -> None:
    """null is OpenAI's "the default": decoded as if the field were not sent."""
    for base, type_ in ((CHAT_BASE, ChatCompletionRequest), (TEXT_BASE, CompletionRequest)):
        nulls = dict.fromkeys(NULLS) | ({"echo": None} if type_ is CompletionRequest else {})
        sent = codec.decode(codec.encode({**base, **nulls}), type_)
        assert sent == codec.decode(codec.encode(base), type_)
        assert (sent.n, sent.stream) == (1, None)
    assert codec.decode(codec.encode({**CHAT_BASE, "n": 3}), ChatCompletionRequest).n == 3


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 0}, "n"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_vllm_extensions_out_of_range_fail_by_name(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(msgspec.ValidationError) as failed:
        codec.decode(codec.encode({**TEXT_BASE, **extra}), CompletionRequest)
    assert codec.error_field(str(failed.value)) == param
