"""A real worker's prefix-cache events and measured rates, seen on a real nats-server."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
import pytest

from schemas import codec
from schemas.base import Envelope
from schemas.kv import KvBlocks
from schemas.load import ModelLoad, WorkerLoad
from schemas.prefix import block_hashes, chat_text, shared_blocks
from schemas.subjects import Subjects
from services.common.bus import Bus, Message
from tests.helpers import eventually, post
from tests.integration.fleet_fixtures import running_worker
from tests.integration.registry_fixtures import running_registry

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
SYSTEM = "You answer questions about the fleet, briefly and politely. " * 40  # ~2.4 KB: 9 blocks


class Stream:
    """Every kv event and heartbeat a test's bus sees, with its subject."""

    def __init__(self) -> None:
        self.kv: list[tuple[str, Envelope[KvBlocks]]] = []
        self.loads: list[Envelope[WorkerLoad]] = []

    async def on_kv(self, msg: Message) -> None:
        self.kv.append((msg.subject, codec.kv_decoder.decode(msg.data)))

    async def on_load(self, msg: Message) -> None:
        self.loads.append(codec.load_decoder.decode(msg.data))

    def events(self) -> list[Envelope[KvBlocks]]:
        return [env for _, env in self.kv]

    def model(self) -> ModelLoad | None:
        return self.loads[-1].body.models[0] if self.loads else None


async def watch(bus: Bus, prefix: str) -> Stream:
    stream = Stream()
    subjects = Subjects.for_prefix(prefix)
    await bus.subscribe(subjects.kv_all, cb=stream.on_kv)
    await bus.subscribe(subjects.load_all, cb=stream.on_load)
    await bus.flush()
    return stream


def chat(user: str, system: str = SYSTEM) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return {"model": "sim-model", "messages": messages, "max_tokens": 4}


def blocks_of(body: dict[str, Any]) -> tuple[int, ...]:
    """What the router computes for this body (schemas/prefix.py)."""
    return block_hashes(chat_text((m["role"], m["content"]) for m in body["messages"]))


def held(events: list[Envelope[KvBlocks]]) -> set[int]:
    """What a router that applied every event in order believes the worker holds."""
    state: set[int] = set()
    for env in events:
        if env.body.full:
            state = set(env.body.stored)
        else:
            state = (state - set(env.body.evicted)) | set(env.body.stored)
    return state


CACHED = {
    "sim_prefix_cache_blocks": 64,
    "sim_prefill_tokens_per_s": 5000.0,
    "sim_ttft_s": 0.0,
    "sim_tokens_per_s": 1000.0,
    "heartbeat_interval_s": 0.1,
}


async def test_snapshot_then_stored_blocks_then_hits(bus: Bus, prefix: str, nats_url: str) -> None:
    stream = await watch(bus, prefix)
    first, second = chat("What is a worker? " * 20), chat("And what is a router? " * 20)
    async with (
        running_registry(nats_url, prefix),
        running_worker(nats_url, prefix, **CACHED, kv_snapshot_interval_s=0.5) as w,
        aiohttp.ClientSession() as s,
    ):
        worker_id = w.service.worker_id
        # the first message after start: the whole (empty) cache, seq 1 of a new stream
        await eventually(lambda: stream.kv)
        subject, env = stream.kv[0]
        assert subject == Subjects.for_prefix(prefix).kv("worker", worker_id)
        assert (env.source, env.seq, env.body.worker_id, env.body.model) == (
            worker_id,
            1,
            worker_id,
            "sim-model",
        )
        assert (env.body.full, env.body.stored, env.body.evicted) == (True, (), ())

        status, _, _ = await post(s, w.url + CHAT, first)
        assert status == 200
        stored = await eventually(
            lambda: [e.body.stored for e in stream.events() if not e.body.full and e.body.stored]
        )
        assert stored[0] == blocks_of(first)  # the blocks the router names, in prompt order
        assert len(blocks_of(first)) == 10
        cold = await eventually(lambda: (m := stream.model()) and m.prefix_lookups == 10 and m)
        assert cold.prefix_hits == 0

        status, _, _ = await post(s, w.url + CHAT, second)
        assert status == 200
        shared = shared_blocks(blocks_of(second), frozenset(blocks_of(first)))
        assert shared == 9  # the system prompt's blocks; the user turns differ after them
        warm = await eventually(lambda: (m := stream.model()) and m.prefix_hits > 0 and m)
        assert (warm.prefix_lookups, warm.prefix_hits) == (10 + len(blocks_of(second)), shared)
        # the rates the router's estimate needs, measured from the two requests
        assert warm.service_s is not None
        assert warm.service_s > 0
        assert warm.prefill_tokens_per_s is not None
        assert 0 < warm.prefill_tokens_per_s <= 5000.0

        # every snapshot_interval the whole cache again; the stream has no gap and one epoch
        before = len(stream.kv)
        await eventually(lambda: any(e.body.full for e in stream.events()[before:]))
        events = stream.events()
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert {e.epoch for e in events} == {events[0].epoch}
        cache = w.service.models["sim-model"].prefix_cache
        assert cache is not None
        assert held(events) == set(cache.snapshot()) == set(blocks_of(first) + blocks_of(second))
        snapshot = next(e for e in events[before:] if e.body.full)
        assert set(snapshot.body.stored) == set(cache.snapshot())


async def test_events_replay_to_the_cache_and_are_batched(
    bus: Bus, prefix: str, nats_url: str
) -> None:
    """Prompts through a small cache: evictions, changes batched at most ~20 messages a second (a
    batch larger than the cache sent as the cache), and a router applying the events in order
    holds what the worker holds."""
    stream = await watch(bus, prefix)
    small = CACHED | {"sim_prefix_cache_blocks": 12, "sim_max_batch": 32}
    async with (
        running_registry(nats_url, prefix),
        running_worker(nats_url, prefix, **small, kv_snapshot_interval_s=60) as w,
        aiohttp.ClientSession() as s,
    ):
        cache = w.service.models["sim-model"].prefix_cache
        assert cache is not None

        def in_step() -> bool:
            return held(stream.events()) == set(cache.snapshot())

        await eventually(lambda: stream.kv)
        bodies = [chat("question", system=f"Topic {i}. " + SYSTEM[:800]) for i in range(17)]
        assert {len(blocks_of(b)) for b in bodies} == {3}
        for body in bodies[:5]:  # one at a time: four fill the cache, the fifth evicts
            assert (await post(s, w.url + CHAT, body))[0] == 200
            await eventually(in_step)
        assert stream.events()[-1].body == KvBlocks(
            worker_id=w.service.worker_id,
            model="sim-model",
            stored=blocks_of(bodies[4]),
            evicted=blocks_of(bodies[0])[::-1],  # the oldest prompt, its tail first
        )
        count = len(stream.kv)
        results = await asyncio.gather(*(post(s, w.url + CHAT, b) for b in bodies[5:]))
        assert {status for status, _, _ in results} == {200}
        await eventually(in_step)
        burst = stream.events()[count:]
        assert len(burst) < len(bodies[5:])  # 12 prompts stored in fewer messages
        assert any(e.body.full for e in burst)  # 36 blocks in, 12 held: the cache is smaller
        events = stream.events()
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        sent = [e.sent_at for e in events]
        assert all(later - earlier >= 0.04 for earlier, later in itertools.pairwise(sent))


async def test_a_worker_without_a_prefix_cache_publishes_no_events(
    bus: Bus, prefix: str, nats_url: str
) -> None:
    stream = await watch(bus, prefix)
    async with (
        running_registry(nats_url, prefix),
        running_worker(nats_url, prefix, heartbeat_interval_s=0.1) as w,
        aiohttp.ClientSession() as s,
    ):
        assert w.service.kv is None
        status, _, _ = await post(s, w.url + CHAT, chat("hello"))
        assert status == 200
        # a heartbeat sent after the request finished: its rates are measured, no cache counted
        measured = await eventually(lambda: (m := stream.model()) and m.service_s is not None and m)
        assert (measured.prefix_lookups, measured.prefix_hits) == (0, 0)
        assert measured.prefill_tokens_per_s is not None
        # two more heartbeats: a kv event published before them would have arrived before them
        count = len(stream.loads)
        await eventually(lambda: len(stream.loads) >= count + 2)
        assert stream.kv == []
