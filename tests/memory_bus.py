"""An in-memory Bus for shell unit tests: NATS core without a server, and no JetStream.

What it keeps of NATS: subjects and wildcards (`*` one token, `>` one or more at the end), queue
groups (one member gets each message; round robin here, random in nats-server), per-subscription
ordered delivery through nats-py's own Subscription (so `sub._id`, `unsubscribe()`, pending limits
and slow consumers behave as there), request/reply with `services.common.bus.reply`, "no
responders" retried until the deadline (the real Bus's loop), RequestTimeout, drain on close.
What a test adds: `disconnect()` / `reconnect()` / `slow_consumer()` fire the trouble a shell
hears through `on_reconnect` / `on_error`, and `settled()` waits until every callback is done.
One bus is one connection: the shell under test and the test that plays its peers share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.common.bus import (
    KV,
    Bus,
    NoRespondersError,
    RequestTimeout,
    SlowConsumerError,
)

log = logging.getLogger(__name__)
_SPACE = re.compile(r"\s")


def matches(pattern: str, subject: str) -> bool:
    """Whether a subscription on `pattern` receives a message published on `subject`."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or token not in ("*", have[i]):
            return False
    return len(want) == len(have)


def check_subject(subject: str, *, pattern: bool) -> None:
    """BadSubjectError for what nats-py refuses to subscribe to; publishing to a wildcard is
    refused too (nats-server would take it literally: here it is always a bug in the caller)."""
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        wildcard = token in ("*", ">")
        if not token or _SPACE.search(token) or (("*" in token or ">" in token) and not wildcard):
            raise nats.errors.BadSubjectError(f"bad subject {subject!r}")
        if wildcard and (not pattern or (token == ">" and i != len(tokens) - 1)):
            raise nats.errors.BadSubjectError(f"bad subject {subject!r}")


@dataclass
class MemoryMessage(Msg):
    """A delivered message; respond() (and so `reply(msg, data)`) answers through the bus."""

    _bus: MemoryBus | None = None

    async def respond(self, data: bytes) -> None:
        if not self.reply:
            raise nats.errors.Error("no reply subject available")
        assert self._bus is not None
        await self._bus.publish(self.reply, data, headers=self.headers)


class _Connection:
    """What a nats-py Subscription asks of its connection, answered by the bus."""

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus

    @property
    def is_closed(self) -> bool:
        return self.bus.closed

    is_draining = is_reconnecting = False

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self.bus._forget(sid)

    async def _send_unsubscribe(self, sid: int, limit: int = 0) -> None:
        """The server's half of unsubscribe; delivery counts `limit` itself (see _deliver)."""

    async def flush(self) -> None:
        await self.bus.flush()


class MemoryBus(Bus):
    """A Bus whose server is this object: pass it wherever a shell takes a Bus."""

    def __init__(self, drain_timeout_s: float = 2.0) -> None:
        # A nats-py Client that never connects: `nc.stats` and a Msg's client field need one.
        super().__init__(Client())
        self.ready = True
        self.closed = False
        self.drain_timeout_s = drain_timeout_s
        self._down = False
        self._conn = _Connection(self)
        self._subs: dict[int, Subscription] = {}
        self._sid = 0
        self._turns: dict[str, int] = {}  # queue group -> deliveries so far (round robin)
        self._answers: dict[str, asyncio.Future[Msg]] = {}  # request inbox -> its reply
        self._delivered = 0

    @property
    def connected(self) -> bool:
        return not self.closed and not self._down

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self._check_open()
        check_subject(subject, pattern=False)
        if self._down:
            return  # lost on the wire, as another connection's messages are during an outage
        answer = self._answers.get(subject)
        if answer is not None and not answer.done():
            answer.set_result(self._message(subject, "", data, headers))
        for sub in self._route(subject):
            await self._deliver(sub, subject, "", data, headers)

    async def _request_once(self, subject: str, data: bytes, timeout_s: float) -> bytes:
        self._check_open()
        check_subject(subject, pattern=False)
        if self._down:  # nats-py holds the request until the reply that cannot come times out
            await asyncio.sleep(timeout_s)
            raise RequestTimeout
        targets = self._route(subject)
        if not targets:
            raise NoRespondersError
        self._sid += 1
        inbox = f"_INBOX.memory.{self._sid}"
        self._answers[inbox] = answer = asyncio.get_running_loop().create_future()
        try:
            for sub in targets:
                await self._deliver(sub, subject, inbox, data, None)
            try:
                msg = await asyncio.wait_for(answer, timeout_s)
            except TimeoutError:
                raise RequestTimeout from None
        finally:
            del self._answers[inbox]
        return bytes(msg.data)

    async def subscribe(
        self,
        subject: str,
        *,
        queue: str = "",
        pending_msgs_limit: int = 512 * 1024,
        cb: Callable[[Msg], Awaitable[None]] | None = None,
    ) -> Subscription:
        self._check_open()
        check_subject(subject, pattern=True)
        if _SPACE.search(queue):
            raise nats.errors.BadSubjectError(f"bad queue group {queue!r}")
        self._sid += 1
        sub = Subscription(
            self._conn,
            self._sid,
            subject,
            queue=queue,
            cb=cb,
            pending_msgs_limit=pending_msgs_limit,
        )
        sub._start(self._report)  # type: ignore[no-untyped-call]  # starts its callback task
        self._subs[sub._id] = sub
        return sub

    async def flush(self, timeout_s: int = 2) -> None:
        """As NATS's round trip promises: what was published before has reached the
        subscriptions; one turn of the loop also lets callbacks that never await finish."""
        self._check_open()
        if self._down:
            await asyncio.sleep(timeout_s)
            raise nats.errors.FlushTimeoutError
        await asyncio.sleep(0)

    async def key_value(
        self,
        bucket: str,
        *,
        history: int = 1,
        create: bool = True,
        replicas: int = 1,
        ready_timeout_s: float = 60.0,
    ) -> KV:
        raise NotImplementedError(
            "MemoryBus has no JetStream: give the shell an in-memory store (tests.memory_bus."
            f"MemoryKV) instead of KV bucket {bucket!r}"
        )

    async def close(self) -> None:
        """Drain: no new deliveries, callbacks finish what is queued (up to drain_timeout_s)."""
        if self.closed:
            return
        self.closing = True
        subs = list(self._subs.values())
        self._subs.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._joined(subs), self.drain_timeout_s)
        for sub in subs:
            sub._stop_processing()
            sub._closed = True
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(nats.errors.ConnectionClosedError())
        self.closed = True

    # ---- what a test does to the connection ----

    async def disconnect(self) -> None:
        """Until reconnect(): not connected, and every message published is lost."""
        self._down = True

    async def reconnect(self) -> None:
        """Back (from disconnect(), or a blip nobody saw): the reconnect listeners run."""
        self._down = False
        self.nc.stats["reconnects"] += 1
        for listener in list(self._reconnect_listeners):
            await listener()

    async def slow_consumer(self, subject: str) -> None:
        """Report a slow consumer (messages dropped) on each subscription to `subject`."""
        for sub in [s for s in self._subs.values() if s.subject == subject]:
            await self._report(SlowConsumerError(subject=subject, reply="", sid=sub._id, sub=sub))

    async def settled(self) -> None:
        """Until every callback has finished every message delivered so far, and those its
        callbacks published in turn (a callback that never returns holds this up)."""
        while True:
            mark = self._delivered
            await self._joined(list(self._subs.values()))
            if self._delivered == mark:
                return

    # ---- delivery ----

    def _check_open(self) -> None:
        if self.closed:
            raise nats.errors.ConnectionClosedError

    def _route(self, subject: str) -> list[Subscription]:
        """Every plain subscription that matches, and one member of each matching queue group."""
        plain: list[Subscription] = []
        groups: dict[str, list[Subscription]] = {}
        for sub in self._subs.values():
            if matches(sub.subject, subject):
                if sub.queue:
                    groups.setdefault(sub.queue, []).append(sub)
                else:
                    plain.append(sub)
        for group, members in groups.items():
            turn = self._turns.get(group, 0)
            self._turns[group] = turn + 1
            plain.append(members[turn % len(members)])
        return plain

    def _message(
        self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None, sid: int = 0
    ) -> MemoryMessage:
        copied = None if headers is None else dict(headers)
        return MemoryMessage(
            _client=self.nc,
            subject=subject,
            reply=reply,
            data=bytes(data),
            headers=copied,
            _sid=sid,
            _bus=self,
        )

    async def _deliver(
        self,
        sub: Subscription,
        subject: str,
        reply: str,
        data: bytes,
        headers: dict[str, str] | None,
    ) -> None:
        """As nats-py's client takes a message off the wire: count it, honour an unsubscribe
        limit, queue it for the subscription, or report a slow consumer when its queue is full."""
        sub._received += 1
        if sub._max_msgs > 0 and sub._received >= sub._max_msgs:
            self._subs.pop(sub._id, None)
        msg = self._message(subject, reply, data, headers, sub._id)
        sub._pending_size += len(msg.data)
        full = 0 < sub._pending_bytes_limit <= sub._pending_size
        if not full:
            try:
                sub._pending_queue.put_nowait(msg)
            except asyncio.QueueFull:
                full = True
        if full:
            sub._pending_size -= len(msg.data)
            await self._report(
                SlowConsumerError(subject=subject, reply=reply, sid=sub._id, sub=sub)
            )
            return
        self._delivered += 1

    async def _report(self, exc: Exception) -> None:
        """What the real Bus does with a NATS error or a callback's exception: log, tell."""
        level = logging.WARNING if isinstance(exc, SlowConsumerError) else logging.ERROR
        log.log(level, "nats error: %r", exc)
        for listener in list(self._error_listeners):
            await listener(exc)

    def _forget(self, sid: int) -> None:
        """Unsubscribed: what it had queued is discarded (and no longer awaited by settled)."""
        sub = self._subs.pop(sid, None)
        while sub is not None and not sub._pending_queue.empty():
            sub._pending_queue.get_nowait()
            sub._pending_queue.task_done()

    @staticmethod
    async def _joined(subs: list[Subscription]) -> None:
        await asyncio.gather(*(s._pending_queue.join() for s in subs if s._cb is not None))


class MemoryKV:
    """A dict-backed stand-in for the KV call shells make (put); revisions count from 1."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.revision = 0

    async def put(self, key: str, value: bytes) -> int:
        self.revision += 1
        self.values[key] = value
        return self.revision
