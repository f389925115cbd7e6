"""Prompt blocks: router and worker must name the same blocks for the same prompt."""

from __future__ import annotations

import msgspec
import pytest

from schemas import codec
from schemas.inference import ChatCompletionRequest
from schemas.kv import KvBlocks
from schemas.prefix import (
    BLOCK_BYTES,
    MAX_BLOCKS,
    PromptFields,
    block_hashes,
    chat_text,
    prompt_text,
    shared_blocks,
)

SYSTEM = "You are a careful assistant. " * 40  # ~1.2 KB: four full blocks


def chat(*turns: tuple[str, str]) -> bytes:
    return codec.encode({"model": "m", "messages": [{"role": r, "content": c} for r, c in turns]})


def router_blocks(body: bytes) -> tuple[int, ...]:
    return block_hashes(prompt_text(codec.decode(body, PromptFields)))


def worker_blocks(body: bytes) -> tuple[int, ...]:
    request = codec.decode(body, ChatCompletionRequest)
    return block_hashes(chat_text((m.role, m.text()) for m in request.messages))


def test_router_and_worker_name_the_same_blocks() -> None:
    body = chat(("system", SYSTEM), ("user", "hello " * 100))
    assert router_blocks(body) == worker_blocks(body)
    assert (
        len(router_blocks(body))
        == len(chat_text([("system", SYSTEM), ("user", "hello " * 100)])) // BLOCK_BYTES
    )


def test_text_parts_count_like_the_worker_reads_them() -> None:
    parts = [{"type": "text", "text": SYSTEM}, {"type": "image_url", "image_url": {"url": "x"}}]
    body = codec.encode({"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert router_blocks(body) == worker_blocks(body) != ()


def test_a_shared_system_prompt_shares_leading_blocks_and_no_more() -> None:
    a = router_blocks(chat(("system", SYSTEM), ("user", "a question " * 50)))
    b = router_blocks(chat(("system", SYSTEM), ("user", "another one " * 50)))
    common = len(SYSTEM.encode()) // BLOCK_BYTES  # blocks wholly inside the system prompt
    assert a[:common] == b[:common]
    assert a[common + 1 :] != b[common + 1 :]
    assert shared_blocks(b, set(a)) in (common, common + 1)


def test_a_conversation_that_resends_its_history_finds_all_of_it() -> None:
    first = router_blocks(chat(("system", SYSTEM), ("user", "q1 " * 200)))
    second = router_blocks(
        chat(("system", SYSTEM), ("user", "q1 " * 200), ("assistant", "a1 " * 100), ("user", "q2"))
    )
    assert second[: len(first)] == first
    assert shared_blocks(second, frozenset(first)) == len(first)


def test_a_chain_stops_at_the_first_missing_block() -> None:
    blocks = (1, 2, 3, 4)
    assert shared_blocks(blocks, {1, 2, 4}) == 2
    assert shared_blocks(blocks, set()) == 0
    assert shared_blocks((), {1}) == 0


def test_only_full_blocks_and_at_most_max_blocks() -> None:
    assert block_hashes(b"x" * (BLOCK_BYTES - 1)) == ()
    assert len(block_hashes(b"x" * (BLOCK_BYTES * 3 + 7))) == 3
    assert len(block_hashes(b"x" * (BLOCK_BYTES * (MAX_BLOCKS + 2)))) == MAX_BLOCKS
    # the same bytes at another position are another block: the hash names the whole prefix
    same = block_hashes(b"x" * (BLOCK_BYTES * 2))
    assert same[0] != same[1]
    assert all(0 <= h < 2**63 for h in same)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model": "m", "prompt": "abc"}', b"abc"),
        (b'{"model": "m", "prompt": ["abc"]}', b"abc"),
        (b'{"model": "m"}', b""),
        (b'{"model": "m", "messages": [], "extra": {"x": 1}}', b""),
    ],
)
def test_prompt_text_of_completions_and_odd_bodies(body: bytes, expected: bytes) -> None:
    assert prompt_text(codec.decode(body, PromptFields)) == expected


def test_block_events_round_trip_and_bound_their_hashes() -> None:
    event = KvBlocks(worker_id="w1", model="m", stored=(1, 2**63 - 1), evicted=(3,))
    assert codec.decode(codec.encode(event), KvBlocks) == event
    with pytest.raises(msgspec.ValidationError):
        codec.decode(
            b'{"worker_id": "w1", "model": "m", "stored": [18446744073709551615]}', KvBlocks
        )
