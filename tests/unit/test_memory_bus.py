"""The in-memory bus keeps the NATS behaviour shells rely on (tests/unit/test_bus.py compares the
subject matching and request/reply with a real nats-server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats.errors
import pytest

from services.common.bus import (
    Message,
    NoRespondersError,
    RequestTimeout,
    SlowConsumerError,
    reply,
)
from tests.memory_bus import MemoryBus, MemoryKV, matches

# (subscription, published subject, delivered?) as nats-server decides it.
MATCHES = [
    ("a.b", "a.b", True),
    ("a.b", "a.b.c", False),
    ("a.b", "a", False),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    ("*.b", "a.b", True),
    ("*", "a.b", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.b.d", False),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c", True),
    ("a.>", "a", False),
    (">", "a", True),
    (">", "a.b.c", True),
    ("a.*.>", "a.b", False),
    ("a.*.>", "a.b.c.d", True),
]


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    b = MemoryBus()
    try:
        yield b
    finally:
        await b.close()


class Inbox:
    """Records (subject, data) of what its callback receives (nats-py takes only a coroutine
    function as a callback, not a callable object: so does the memory bus)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    async def on_msg(self, msg: Message) -> None:
        self.got.append((msg.subject, msg.data))


@pytest.mark.parametrize(("pattern", "subject", "delivered"), MATCHES)
def test_wildcards_match_as_in_nats(pattern: str, subject: str, delivered: bool) -> None:
    assert matches(pattern, subject) is delivered


async def test_a_subscription_gets_what_its_pattern_matches(bus: MemoryBus) -> None:
    inboxes = {pattern: Inbox() for pattern, _, _ in MATCHES}
    for pattern, inbox in inboxes.items():
        await bus.subscribe(pattern, cb=inbox.on_msg)
    for subject in sorted({subject for _, subject, _ in MATCHES}):
        await bus.publish(subject, b"x")
    await bus.settled()
    for pattern, subject, delivered in MATCHES:
        assert ((subject, b"x") in inboxes[pattern].got) is delivered, (pattern, subject)


async def test_bad_subjects_are_refused(bus: MemoryBus) -> None:
    for pattern in ("", "a..b", "a.>.b", "a*", "a b"):
        with pytest.raises(nats.errors.BadSubjectError):
            await bus.subscribe(pattern, cb=Inbox().on_msg)
    for subject in ("a.*", "a.>", "a..b"):
        with pytest.raises(nats.errors.BadSubjectError):
            await bus.publish(subject, b"")


async def test_one_member_of_a_queue_group_gets_each_message(bus: MemoryBus) -> None:
    members = [Inbox() for _ in range(3)]
    everyone = Inbox()
    for member in members:
        await bus.subscribe("jobs.*", queue="workers", cb=member.on_msg)
    await bus.subscribe("jobs.>", cb=everyone.on_msg)
    for n in range(6):
        await bus.publish(f"jobs.{n}", str(n).encode())
    await bus.settled()
    assert len(everyone.got) == 6
    assert sorted(got for m in members for got in m.got) == sorted(everyone.got)
    assert [len(m.got) for m in members] == [2, 2, 2]


async def test_messages_arrive_in_order_and_flush_lets_callbacks_run(bus: MemoryBus) -> None:
    inbox = Inbox()
    await bus.subscribe("s", cb=inbox.on_msg)
    for n in range(50):
        await bus.publish("s", bytes([n]))
    await bus.flush()  # a callback that never awaits has run, as after a NATS round trip
    assert [data for _, data in inbox.got] == [bytes([n]) for n in range(50)]


async def test_settled_waits_for_callbacks_and_what_they_publish(bus: MemoryBus) -> None:
    done = Inbox()

    async def slow_relay(msg: Message) -> None:
        for _ in range(5):
            await asyncio.sleep(0)
        await bus.publish("done", msg.data)

    await bus.subscribe("start", cb=slow_relay)
    await bus.subscribe("done", cb=done.on_msg)
    await bus.publish("start", b"1")
    await bus.settled()
    assert done.got == [("done", b"1")]


async def test_request_is_answered_through_reply(bus: MemoryBus) -> None:
    async def echo(msg: Message) -> None:
        assert msg.reply
        await reply(msg, b"re: " + msg.data)

    await bus.subscribe("svc.echo", queue="svc", cb=echo)
    assert await bus.request("svc.echo", b"hi", timeout_s=1) == b"re: hi"


async def test_nobody_listening_is_no_responders(bus: MemoryBus) -> None:
    await bus.subscribe("other", cb=Inbox().on_msg)
    with pytest.raises(NoRespondersError):
        await bus.request("nobody.home", b"", timeout_s=0.05)


async def test_no_responders_is_retried_until_the_deadline(bus: MemoryBus) -> None:
    async def late_responder() -> None:
        async def answer(msg: Message) -> None:
            await reply(msg, b"here")

        await bus.subscribe("late", cb=answer)

    # the first try finds nobody; the responder subscribes while the bus waits to retry
    asking = asyncio.create_task(bus.request("late", b"", timeout_s=2))
    await asyncio.sleep(0)
    await late_responder()
    assert await asking == b"here"


async def test_a_listener_that_does_not_answer_is_a_timeout(bus: MemoryBus) -> None:
    await bus.subscribe("mute", cb=Inbox().on_msg)
    with pytest.raises(RequestTimeout):
        await bus.request("mute", b"", timeout_s=0.05)


async def test_a_failing_callback_is_reported_and_its_subscription_goes_on(bus: MemoryBus) -> None:
    errors: list[Exception] = []
    seen: list[bytes] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    async def picky(msg: Message) -> None:
        if msg.data == b"bad":
            raise ValueError("bad")
        seen.append(msg.data)

    bus.on_error(on_error)
    await bus.subscribe("s", cb=picky)
    for data in (b"bad", b"good"):
        await bus.publish("s", data)
    await bus.settled()
    assert [type(e) for e in errors] == [ValueError]
    assert seen == [b"good"]


async def test_a_full_subscription_is_a_slow_consumer(bus: MemoryBus) -> None:
    errors: list[Exception] = []
    release = asyncio.Event()
    seen: list[bytes] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    async def stuck(msg: Message) -> None:
        await release.wait()
        seen.append(msg.data)

    bus.on_error(on_error)
    sub = await bus.subscribe("s", cb=stuck, pending_msgs_limit=1)
    await bus.publish("s", b"1")
    await bus.flush()  # the callback holds message 1; message 2 waits in the queue
    await bus.publish("s", b"2")
    await bus.publish("s", b"3")  # the queue is full: dropped, reported
    assert [(type(e), getattr(e, "sid", None)) for e in errors] == [(SlowConsumerError, sub._id)]
    release.set()
    await bus.settled()
    assert seen == [b"1", b"2"]


async def test_a_test_fires_reconnects_and_slow_consumers(bus: MemoryBus) -> None:
    heard: list[str] = []

    async def on_reconnect() -> None:
        heard.append("reconnect")

    async def on_error(exc: Exception) -> None:
        assert isinstance(exc, SlowConsumerError)
        heard.append(f"slow {exc.subject} {exc.sid}")

    bus.on_reconnect(on_reconnect)
    bus.on_error(on_error)
    inbox = Inbox()
    sub = await bus.subscribe("events", cb=inbox.on_msg)
    await bus.disconnect()
    states = [bus.connected]
    await bus.publish("events", b"lost")
    await bus.reconnect()
    states.append(bus.connected)
    assert states == [False, True]
    assert bus.nc.stats["reconnects"] == 1
    await bus.slow_consumer("events")
    await bus.publish("events", b"kept")
    await bus.settled()
    assert heard == ["reconnect", f"slow events {sub._id}"]
    assert inbox.got == [("events", b"kept")]


async def test_unsubscribe_stops_delivery(bus: MemoryBus) -> None:
    inbox = Inbox()
    sub = await bus.subscribe("s", cb=inbox.on_msg)
    await bus.publish("s", b"1")
    await bus.settled()
    await sub.unsubscribe()
    await bus.publish("s", b"2")
    await bus.settled()
    assert inbox.got == [("s", b"1")]


async def test_a_subscription_without_callback_is_read_with_next_msg(bus: MemoryBus) -> None:
    sub = await bus.subscribe("s")
    await bus.publish("s", b"1", headers={"k": "v"})
    msg = await sub.next_msg(timeout=1)
    assert (msg.data, msg.headers) == (b"1", {"k": "v"})


async def test_close_drains_then_refuses() -> None:
    bus = MemoryBus()
    seen: list[bytes] = []

    async def slow(msg: Message) -> None:
        await asyncio.sleep(0)
        seen.append(msg.data)

    await bus.subscribe("s", cb=slow)
    for data in (b"1", b"2"):
        await bus.publish("s", data)
    await bus.close()
    assert seen == [b"1", b"2"]
    assert not bus.connected
    with pytest.raises(nats.errors.ConnectionClosedError):
        await bus.publish("s", b"3")
    await bus.close()  # twice is fine


async def test_there_is_no_jetstream(bus: MemoryBus) -> None:
    with pytest.raises(NotImplementedError, match="MemoryKV"):
        await bus.key_value("capacity")


async def test_memory_kv_counts_revisions() -> None:
    kv = MemoryKV()
    assert await kv.put("view", b"1") == 1
    assert await kv.put("view", b"2") == 2
    assert kv.values == {"view": b"2"}
