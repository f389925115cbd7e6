"""Worker HTTP API with the sim engine: admission, error envelopes, the official openai client."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import msgspec
import openai
import pytest

from schemas.inference import ChatMessage
from tests.helpers import assert_error_envelope, eventually, post, queue_and_leave
from tests.integration.fleet_fixtures import running_worker
from tests.integration.registry_fixtures import running_registry

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


def chat_body(model: str = "sim-model", max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi there"}],
        "max_tokens": max_tokens,
        **extra,
    }


async def test_admission_queue_reject_timeout_and_counters(nats_url: str, prefix: str) -> None:
    async with (
        running_worker(
            nats_url,
            prefix,
            register=False,
            max_in_flight=2,
            max_queue_depth=2,
            max_wait_s=0.8,
            sim_tokens_per_s=20.0,
        ) as w,
        aiohttp.ClientSession() as s,
    ):
        gate = w.service.models["sim-model"].gate
        slow = [
            asyncio.create_task(post(s, w.url + CHAT, chat_body(max_tokens=30))) for _ in range(4)
        ]
        await eventually(lambda: (gate.core.in_flight, gate.core.queue_depth) == (2, 2))
        began = time.perf_counter()
        status, body, headers = await post(s, w.url + CHAT, chat_body())
        rejected_in = time.perf_counter() - began
        assert status == 503
        assert rejected_in < 0.5, rejected_in  # a full queue answers at once, not after max_wait
        assert_error_envelope(body, "rate_limit_exceeded", "service_unavailable_error")
        assert int(headers["Retry-After"]) >= 1
        results = await asyncio.gather(*slow)
        # two ran; two waited 0.8 s without a slot (30 tokens at 20/s = 1.5 s) and timed out
        assert sorted(r[0] for r in results) == [200, 200, 503, 503]
        timed_out = [r for r in results if r[0] == 503]
        assert all("no slot freed in time" in r[1]["error"]["message"] for r in timed_out)
        assert (gate.core.in_flight, gate.core.queue_depth) == (0, 0)
        async with s.get(w.url + "/metrics") as resp:
            text = await resp.text()
        rejections = "switchboard_worker_admission_rejections_total"
        assert f'{rejections}{{model="sim-model",reason="queue_full"}} 1.0' in text
        assert f'{rejections}{{model="sim-model",reason="timeout"}} 2.0' in text


async def test_burst_of_200_mixed_requests_leaves_no_slot_behind(
    nats_url: str, prefix: str
) -> None:
    async with running_worker(
        nats_url,
        prefix,
        register=False,
        max_in_flight=4,
        max_queue_depth=20,
        max_wait_s=0.5,
        sim_tokens_per_s=400.0,
    ) as w:
        gate = w.service.models["sim-model"].gate
        timeout = aiohttp.ClientTimeout(total=0.05)

        async def one(i: int) -> str:
            async with aiohttp.ClientSession() as s:
                if i % 4 == 0:  # client disconnects mid-request
                    try:
                        async with s.post(
                            w.url + CHAT,
                            json=chat_body(max_tokens=50, stream=i % 8 == 0),
                            timeout=timeout,
                        ) as resp:
                            await resp.read()
                            return str(resp.status)  # answered in time (a fast 503, say)
                    except TimeoutError:
                        return "disconnected"
                if i % 4 == 1:  # malformed: an error path
                    async with s.post(w.url + CHAT, data=b"{nope") as resp:
                        return str(resp.status)
                async with s.post(
                    w.url + CHAT, json=chat_body(max_tokens=5, stream=i % 2 == 0)
                ) as resp:
                    await resp.read()
                    return str(resp.status)

        outcomes = await asyncio.gather(*(one(i) for i in range(200)))
        assert (
            {"disconnected", "400", "200", "503"} >= set(outcomes) >= {"disconnected", "400", "200"}
        )
        await eventually(
            lambda: (gate.core.in_flight, gate.core.queue_depth) == (0, 0), timeout_s=5
        )
        assert w.service.models["sim-model"].engine.running == 0


async def test_disconnect_frees_the_slot_and_stops_generation(nats_url: str, prefix: str) -> None:
    async with (
        running_worker(
            nats_url, prefix, register=False, max_in_flight=1, sim_tokens_per_s=50.0
        ) as w,
        aiohttp.ClientSession() as s,
    ):
        engine = w.service.models["sim-model"].engine
        gate = w.service.models["sim-model"].gate
        for stream in (True, False):
            with pytest.raises(TimeoutError):
                async with s.post(
                    w.url + CHAT,
                    json=chat_body(max_tokens=1000, stream=stream),
                    timeout=aiohttp.ClientTimeout(total=0.3),
                ) as resp:
                    await resp.read()
            await eventually(lambda: gate.core.in_flight == 0 and engine.running == 0, timeout_s=3)


@pytest.mark.parametrize(
    ("path", "body", "status", "type_", "code"),
    [
        (CHAT, b"{not json", 400, "invalid_request_error", "invalid_json"),
        (
            CHAT,
            {"model": "sim-model", "messages": []},
            400,
            "invalid_request_error",
            "invalid_value",
        ),
        (
            CHAT,
            {"model": "sim-model", "messages": [{"role": "user", "content": "x"}], "n": 129},
            400,
            "invalid_request_error",
            "invalid_value",
        ),
        (
            CHAT,
            {
                "model": "sim-model",
                "messages": [{"role": "user", "content": "x"}],
                "temperature": 9,
            },
            400,
            "invalid_request_error",
            "invalid_value",
        ),
        (CHAT, chat_body(model="nope"), 404, "invalid_request_error", "model_not_found"),
        (CHAT, chat_body(max_tokens=5000), 400, "invalid_request_error", "context_length_exceeded"),
        (CHAT, b"x" * (2 << 20), 413, "invalid_request_error", "request_too_large"),
        ("/v1/completions", {"model": "sim-model"}, 400, "invalid_request_error", "invalid_value"),
        (CHAT, chat_body(n=9), 400, "invalid_request_error", "invalid_value"),  # max_n 8
        (CHAT, chat_body(top_logprobs=2), 400, "invalid_request_error", "invalid_value"),
        (CHAT, chat_body(tools=[{}]), 400, "invalid_request_error", "invalid_value"),
        (
            CHAT,
            chat_body(functions=[{"name": "f"}]),
            400,
            "invalid_request_error",
            "unsupported_parameter",
        ),
        (
            "/v1/completions",
            {"model": "sim-model", "prompt": "x", "echo": True},
            400,
            "invalid_request_error",
            "unsupported_parameter",
        ),
    ],
)
async def test_error_envelopes(
    nats_url: str, prefix: str, path: str, body: Any, status: int, type_: str, code: str
) -> None:
    async with running_worker(nats_url, prefix, register=False) as w, aiohttp.ClientSession() as s:
        got, data, _ = await post(s, w.url + path, body)
        assert got == status
        assert_error_envelope(data, code, type_)


async def test_official_openai_client_stream_and_not(nats_url: str, prefix: str) -> None:
    async with running_worker(nats_url, prefix, register=False, models=("alpha", "beta")) as w:
        client = openai.AsyncOpenAI(base_url=w.url + "/v1", api_key="unused", max_retries=0)
        engine = w.service.models["alpha"].engine
        messages: list[Any] = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "say hi"},
        ]
        prompt_tokens = engine.count_tokens(
            engine.chat_prompt([ChatMessage(**m) for m in messages])
        )
        full = await client.chat.completions.create(model="alpha", messages=messages, max_tokens=7)
        assert full.choices[0].finish_reason == "length"
        assert full.usage is not None
        assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (prompt_tokens, 7)
        assert engine.count_tokens(full.choices[0].message.content or "") == 7
        stream = await client.chat.completions.create(
            model="alpha",
            messages=messages,
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage, finish = [], None, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(pieces) == full.choices[0].message.content  # deterministic engine
        assert finish == "length"
        assert usage is not None
        assert usage.completion_tokens == 7
        # the defaults many clients always send are served; a feature no engine has is refused
        # by name, not answered as if it had not been asked for
        plain = await client.chat.completions.create(
            model="alpha",
            messages=messages,
            max_tokens=7,
            presence_penalty=0,
            frequency_penalty=0,
            logprobs=False,
        )
        assert plain.choices[0].message.content == full.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="alpha",
                messages=messages,
                max_tokens=7,
                functions=[{"name": "f", "parameters": {"type": "object"}}],
            )
        assert refused.value.code == "unsupported_parameter"
        assert refused.value.param == "functions"
        text = await client.completions.create(model="beta", prompt="once upon", max_tokens=4)
        assert text.usage is not None
        assert text.usage.completion_tokens == 4
        models = await client.models.list()
        assert sorted(m.id for m in models.data) == ["alpha", "beta"]
        await client.close()


async def test_health_reports_the_heartbeats_load_and_503_once_draining(
    nats_url: str, prefix: str
) -> None:
    async with (
        running_registry(nats_url, prefix),
        running_worker(
            nats_url, prefix, max_in_flight=1, max_queue_depth=3, sim_tokens_per_s=20.0
        ) as w,
        aiohttp.ClientSession() as s,
    ):
        gate = w.service.models["sim-model"].gate
        long = [{"role": "user", "content": "word " * 80}]  # a prefill-rate sample (64+ tokens)
        busy = [
            asyncio.create_task(post(s, w.url + CHAT, chat_body(max_tokens=20, messages=long)))
            for _ in "ab"
        ]
        await eventually(lambda: (gate.core.in_flight, gate.core.queue_depth) == (1, 1))
        async with s.get(w.url + "/health") as resp:
            assert resp.status == 200
            health = await resp.json()
        assert health == {
            "status": "ready",
            "models": [
                {
                    "id": "sim-model",
                    "in_flight": 1,
                    "queue_depth": 1,
                    "max_in_flight": 1,
                    "max_queue_depth": 3,
                    # nothing finished yet: no rates measured; the sim keeps no prefix cache
                    "service_s": None,
                    "prefill_tokens_per_s": None,
                    "prefix_lookups": 0,
                    "prefix_hits": 0,
                }
            ],
        }
        # the same numbers the heartbeat carries
        assert health["models"] == list(msgspec.to_builtins(w.service.lifecycle.load().models))
        await asyncio.gather(*busy)
        async with s.get(w.url + "/health") as resp:  # both finished: their rates are measured
            (model,) = (await resp.json())["models"]
        assert model["service_s"] > 0.5  # 20 tokens at 20/s each
        assert model["prefill_tokens_per_s"] > 0
        assert (model["prefix_lookups"], model["prefix_hits"]) == (0, 0)
        assert [model] == list(msgspec.to_builtins(w.service.lifecycle.load().models))
        gate.drain()
        async with s.get(w.url + "/health") as resp:
            assert resp.status == 503
            assert (await resp.json())["status"] == "draining"
        async with s.get(w.url + "/healthz") as resp:  # liveness is another question
            assert resp.status == 200
        async with s.get(w.url + "/v1/nope") as resp:  # Starlette's own 404, in the envelope
            assert resp.status == 404
            assert_error_envelope(await resp.json(), "not_found")


async def test_clients_leaving_the_workers_queue_free_it_and_start_no_job(
    nats_url: str, prefix: str
) -> None:
    async with (
        running_registry(nats_url, prefix),
        running_worker(nats_url, prefix, max_in_flight=1, max_queue_depth=32, max_wait_s=60.0) as w,
        aiohttp.ClientSession() as s,
    ):
        gate = w.service.models["sim-model"].gate
        hog = chat_body(max_tokens=2000) | {"stream": True}
        async with s.post(w.url + CHAT, json=hog) as held:
            await held.content.readany()
            await queue_and_leave(w.url + CHAT, chat_body(), 10, lambda: gate.core.queue_depth)
            # well inside the 60 s wait: only the disconnects can have freed the places
            await eventually(lambda: gate.core.queue_depth == 0, timeout_s=2)
            assert gate.core.in_flight == 1
        status, _, _ = await post(s, w.url + CHAT, chat_body())
        assert status == 200
        await eventually(gate.idle.is_set)
        async with s.get(w.url + "/metrics") as resp:
            done = 'switchboard_worker_request_duration_seconds_count{model="sim-model"} 2.0'
            assert done in (await resp.text()).splitlines()  # the hog and the last: no leaver


TEXT = "/v1/completions"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
FILE = {"type": "file", "file": {"file_id": "file-1"}}


def parts(*content: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": "look"}, *content]}


async def test_refusals_name_the_field_at_fault(nats_url: str, prefix: str) -> None:
    too_long = " ".join(["w"] * 64)  # the sim counts a token per word: the context is 64
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        (CHAT, {"model": "sim-model"}, "invalid_value", "messages"),
        (TEXT, {"model": "sim-model"}, "invalid_value", "prompt"),
        (CHAT, {"messages": [parts()]}, "invalid_value", "model"),
        (
            CHAT,
            {"model": "sim-model", "messages": [parts(IMAGE)]},
            "unsupported_content",
            "messages[0].content[1]",
        ),
        (
            CHAT,
            {"model": "sim-model", "messages": [parts(), parts(AUDIO)]},
            "unsupported_content",
            "messages[1].content[1]",
        ),
        (
            CHAT,
            {"model": "sim-model", "messages": [{"role": "user", "content": [FILE]}]},
            "unsupported_content",
            "messages[0].content[0]",
        ),
        (CHAT, chat_body(max_tokens=61), "context_length_exceeded", "max_tokens"),
        (
            CHAT,
            {"model": "sim-model", "messages": [{"role": "user", "content": too_long}]},
            "context_length_exceeded",
            "messages",
        ),
        (TEXT, {"model": "sim-model", "prompt": too_long}, "context_length_exceeded", "prompt"),
        # features no engine here has: named, never answered as if not asked
        *(
            (CHAT, chat_body() | {field: value}, "unsupported_parameter", field)
            for field, value in [
                ("audio", {"voice": "alloy", "format": "wav"}),
                ("modalities", ["text", "audio"]),
                ("web_search_options", {}),
                ("function_call", {"name": "f"}),
                ("reasoning_effort", "low"),
                ("verbosity", "low"),
            ]
        ),
    ]
    async with (
        running_worker(nats_url, prefix, register=False, sim_max_context=64) as w,
        aiohttp.ClientSession() as s,
    ):
        got = []
        for path, body, _, _ in cases:
            status, data, _ = await post(s, w.url + path, body)
            error = data["error"] if status == 400 else {}
            got.append((status, error.get("type"), error.get("code"), error.get("param")))
        assert got == [(400, "invalid_request_error", code, param) for *_, code, param in cases]
        # text parts are served, and so are the neutral values of the fields above
        neutral = {"modalities": ["text"], "function_call": "auto", "verbosity": "medium"}
        status, _, _ = await post(
            s, w.url + CHAT, {"model": "sim-model", "messages": [parts()], **neutral}
        )
        assert status == 200
        # image parts too, once the engine says it takes them
        engine = w.service.models["sim-model"].engine
        engine.limits = msgspec.structs.replace(engine.limits, accepts_images=True)
        status, _, _ = await post(
            s, w.url + CHAT, {"model": "sim-model", "messages": [parts(IMAGE)]}
        )
        assert status == 200
        status, data, _ = await post(
            s, w.url + CHAT, {"model": "sim-model", "messages": [parts(IMAGE, AUDIO)]}
        )
        assert (status, data["error"]["param"]) == (400, "messages[0].content[2]")


async def test_default_max_tokens_is_the_rest_of_the_context(nats_url: str, prefix: str) -> None:
    # a context well over the 256 tokens that once were the default
    fast = {"sim_max_context": 600, "sim_tokens_per_s": 1e6, "sim_ttft_s": 0.0}
    chat = {"model": "sim-model", "messages": [{"role": "user", "content": "hi there"}]}
    text = {"model": "sim-model", "prompt": "once upon a time"}
    async with aiohttp.ClientSession() as s:
        async with running_worker(nats_url, prefix, register=False, **fast) as w:
            for path, body in ((CHAT, chat), (TEXT, text)):
                status, data, _ = await post(s, w.url + path, body)
                assert status == 200, data
                assert data["usage"]["total_tokens"] == 600  # filled the context
                assert data["choices"][0]["finish_reason"] == "length"
        # a configured cap still bounds it
        async with running_worker(
            nats_url, prefix, register=False, default_max_tokens=5, **fast
        ) as w:
            status, data, _ = await post(s, w.url + CHAT, chat)
            assert (status, data["usage"]["completion_tokens"]) == (200, 5)


async def test_retrieve_a_model(nats_url: str, prefix: str) -> None:
    async with (
        running_worker(nats_url, prefix, register=False, models=("alpha", "org/beta")) as w,
        aiohttp.ClientSession() as s,
    ):
        async with s.get(w.url + "/v1/models") as resp:
            listed = (await resp.json())["data"]
        for card in listed:
            async with s.get(w.url + "/v1/models/" + card["id"]) as resp:
                assert resp.status == 200
                assert await resp.json() == card
        assert set(listed[0]) == {"id", "object", "created", "owned_by"}
        assert listed[0]["object"] == "model"
        async with s.get(w.url + "/v1/models/nope") as resp:
            assert resp.status == 404
            body = await resp.json()
        assert_error_envelope(body, "model_not_found", "invalid_request_error")
        assert body["error"]["param"] == "model"


async def test_n_choices_take_n_slots_or_none(nats_url: str, prefix: str) -> None:
    """Each choice is a job holding a slot: a request that cannot have all n is the busy 503
    (no choice starts); more than the model's slots is a 400 naming n; a disconnected n-choice
    stream stops every job."""
    async with (
        running_worker(
            nats_url,
            prefix,
            register=False,
            max_in_flight=3,
            max_queue_depth=0,
            sim_tokens_per_s=40.0,
        ) as w,
        aiohttp.ClientSession() as s,
    ):
        gate = w.service.models["sim-model"].gate
        engine = w.service.models["sim-model"].engine
        hog = asyncio.create_task(post(s, w.url + CHAT, chat_body(max_tokens=20)))
        await eventually(lambda: engine.running == 1)
        status, body, headers = await post(s, w.url + CHAT, chat_body(n=3))
        assert status == 503, body
        assert_error_envelope(body, "rate_limit_exceeded", "service_unavailable_error")
        assert int(headers["Retry-After"]) >= 1
        assert (gate.core.in_flight, gate.core.queue_depth, engine.running) == (1, 0, 1)
        status, body, _ = await post(s, w.url + CHAT, chat_body(n=4))
        assert (status, body["error"]["param"]) == (400, "n"), body
        status, body, _ = await post(s, w.url + CHAT, chat_body(n=2, max_tokens=3))
        assert status == 200, body  # two of the three slots were free
        assert [c["index"] for c in body["choices"]] == [0, 1]
        assert body["usage"]["completion_tokens"] == 6
        assert engine.peak_running == 3
        assert (await hog)[0] == 200
        await read_and_leave(w.url, chat_body(n=3, max_tokens=500, stream=True))
        await eventually(lambda: gate.core.in_flight == 0 and engine.running == 0)


async def read_and_leave(url: str, body: dict[str, Any]) -> None:
    """A client that reads the first bytes of a stream, then goes away."""
    async with aiohttp.ClientSession() as s, s.post(url + CHAT, json=body) as resp:
        assert resp.status == 200
        await resp.content.readline()
