"""Prefix-cache-aware routing with a real router and sim workers: a request sharing a prefix goes
to the replica that holds it, unless that replica is full; who may speak for a worker's cache."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from schemas import codec
from schemas.kv import KvBlocks
from schemas.prefix import BLOCK_BYTES, block_hashes, chat_text, shared_blocks
from schemas.subjects import Subjects
from services.common.bus import Bus
from services.common.seq import Sequencer
from services.worker.config import DEFAULT_PRINCIPAL
from tests.helpers import delivered, eventually, post
from tests.integration.fleet_fixtures import fleet

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
MODEL = "sim-model"
WORKER_DONE = f'switchboard_worker_request_duration_seconds_count{{model="{MODEL}"}}'
SYSTEM = "You are a careful assistant who answers in full sentences. " * 70  # ~4 KB
SYSTEM_BLOCKS = len(chat_text([("system", SYSTEM)])) // BLOCK_BYTES  # 16 full blocks


def ask(question: str, max_tokens: int = 4) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ],
        "max_tokens": max_tokens,
    }


def blocks_of(question: str) -> tuple[int, ...]:
    return block_hashes(chat_text([("system", SYSTEM), ("user", question)]))


async def served(s: aiohttp.ClientSession, worker: Any) -> float:
    async with s.get(worker.url + "/metrics") as resp:
        text = await resp.text()
    found = [line for line in text.splitlines() if line.startswith(WORKER_DONE + " ")]
    return float(found[0].split()[-1]) if found else 0.0


async def test_a_shared_prefix_goes_to_its_holder_unless_it_is_full(
    nats_url: str, prefix: str
) -> None:
    # Two slots each; prefill fast enough that the router's estimate is about queue waits.
    cached = {
        "sim_prefix_cache_blocks": 1024,
        "sim_prefill_tokens_per_s": 50_000.0,
        "sim_tokens_per_s": 200.0,
        "max_in_flight": 2,
        "max_queue_depth": 8,
        "kv_snapshot_interval_s": 0.5,
    }
    async with (
        fleet(nats_url, prefix, [cached, cached]) as (router, (a, b)),
        aiohttp.ClientSession() as s,
    ):
        view = router.service.view
        a_id = a.service.worker_id
        # a prefills the system prompt (a request sent to it directly, as another router would)
        assert (await post(s, a.url + CHAT, ask("What is NATS?", max_tokens=100)))[0] == 200
        wanted = blocks_of("And JetStream?")
        assert shared_blocks(wanted, set(blocks_of("What is NATS?"))) == SYSTEM_BLOCKS
        # the router learns it from a's KvBlocks events
        await eventually(
            lambda: shared_blocks(wanted, set(view.caches.held(a_id, MODEL))) == SYSTEM_BLOCKS
        )
        # a busier than b but with a free slot: without the prefix b would win the tie
        hogs = [asyncio.create_task(post(s, a.url + CHAT, ask("Tell me a story.", 2000)))]
        await eventually(lambda: view.score(a_id, MODEL) == 1)  # as a's heartbeat says
        before = (await served(s, a), await served(s, b))
        assert (await post(s, router.url + CHAT, ask("And JetStream?")))[0] == 200
        assert (await served(s, a), await served(s, b)) == (before[0] + 1, before[1])
        # a's cache served it: its heartbeat counts the hits
        await eventually(
            lambda: (
                (load := view.model_load(a_id, MODEL)) is not None
                and load.prefix_hits >= SYSTEM_BLOCKS
            )
        )

        # a full: both its slots taken by long answers
        hogs.append(asyncio.create_task(post(s, a.url + CHAT, ask("Another story.", 2000))))
        await eventually(lambda: view.score(a_id, MODEL) == 2)
        before = (await served(s, a), await served(s, b))
        assert (await post(s, router.url + CHAT, ask("And the KV store?")))[0] == 200
        # b prefills the whole prompt rather than wait for a slot on a
        assert (await served(s, a), await served(s, b)) == (before[0], before[1] + 1)
        for hog in hogs:
            hog.cancel()
        await asyncio.gather(*hogs, return_exceptions=True)


async def test_only_a_workers_owner_speaks_for_its_cache(
    bus: Bus, nats_url: str, prefix: str
) -> None:
    # no prefix cache in these workers (sim_prefix_cache_blocks 0): every KvBlocks the router
    # sees comes from this test
    plain = {"max_in_flight": 4, "sim_prefill_tokens_per_s": 50_000.0}
    async with (
        fleet(nats_url, prefix, [plain, plain]) as (router, (a, b)),
        aiohttp.ClientSession() as s,
    ):
        view = router.service.view
        subjects = Subjects.for_prefix(prefix)
        a_id, b_id = a.service.worker_id, b.service.worker_id
        registry: CollectorRegistry = router.service.metrics.prometheus

        def rejected(label: str) -> float:
            value = registry.get_sample_value(
                "switchboard_router_messages_rejected_total", {"subject": label}
            )
            return value or 0.0

        wanted = blocks_of("What is NATS?")
        stream = Sequencer(a_id, epoch=time.time_ns())
        claim = KvBlocks(worker_id=a_id, model=MODEL, stored=wanted, full=True)
        # not a's owner / a's body on b's subject / not a KvBlocks at all
        await bus.publish(subjects.kv("someone-else", a_id), codec.encode(stream.stamp(claim, 0)))
        await bus.publish(
            subjects.kv(DEFAULT_PRINCIPAL, b_id), codec.encode(stream.stamp(claim, 0))
        )
        await bus.publish(subjects.kv(DEFAULT_PRINCIPAL, a_id), b'{"seq": "x"}')
        await delivered(bus, router.service.bus)
        await eventually(lambda: rejected("kv") == 2 and rejected("kv.not_owner") == 1)
        assert list(view.caches.held(a_id, MODEL)) == []

        # from a's owner: the router takes it, and a prompt with that prefix goes to a
        await bus.publish(
            subjects.kv(DEFAULT_PRINCIPAL, a_id),
            codec.encode(Sequencer(a_id, epoch=time.time_ns()).stamp(claim, 0)),
        )
        await eventually(lambda: len(view.caches.held(a_id, MODEL)) == len(wanted))
        # a busier than b (one of its 4 slots taken): without the prefix b would win the tie
        hog = asyncio.create_task(post(s, a.url + CHAT, {**ask("A story."), "max_tokens": 2000}))
        await eventually(lambda: view.score(a_id, MODEL) == 1)
        before = (await served(s, a), await served(s, b))
        assert (await post(s, router.url + CHAT, ask("What is NATS?")))[0] == 200
        assert (await served(s, a), await served(s, b)) == (before[0] + 1, before[1])
        hog.cancel()
        await asyncio.gather(hog, return_exceptions=True)
