"""The one typed wrapper around nats-py: connect forever, publish, request, subscribe, KV.

Connection trouble is surfaced to the service through callbacks, because NATS core drops messages
silently on a slow consumer or a reconnect; sequence-tracking consumers treat both as a gap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

Callback = Callable[[], Awaitable[None]]
ErrorCallback = Callable[[Exception], Awaitable[None]]

# Re-exported so shells catch NATS errors without importing nats themselves.
NoRespondersError = nats.errors.NoRespondersError
RequestTimeout = nats.errors.TimeoutError
SlowConsumerError = nats.errors.SlowConsumerError
KeyWrongLastSequenceError = nats.js.errors.KeyWrongLastSequenceError
KeyNotFoundError = nats.js.errors.KeyNotFoundError
KeyDeletedError = nats.js.errors.KeyDeletedError
NoKeysError = nats.js.errors.NoKeysError
BucketNotFoundError = nats.js.errors.BucketNotFoundError
Message = Msg
Sub = Subscription
KV = KeyValue


def servers(url: str) -> list[str]:
    """NATS_URL may list several servers of a cluster, comma-separated (as the nats CLI takes)."""
    found = [u.strip() for u in url.split(",") if u.strip()]
    if not found:
        raise ValueError("no NATS server URL given")
    return found


class Bus:
    """A connected NATS client plus the callbacks a service registered for its trouble."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._reconnect_listeners: list[Callback] = []
        self._error_listeners: list[ErrorCallback] = []
        self.closing = False

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        *,
        connect_timeout_s: float = 5.0,
        user: str = "",
        password: str = "",
    ) -> Bus:
        """Connect, retrying the first connection until it succeeds, and reconnect forever after."""
        bus = cls(Client())

        async def on_error(exc: Exception) -> None:
            level = logging.WARNING if isinstance(exc, SlowConsumerError) else logging.ERROR
            log.log(level, "nats error: %r", exc, extra={"subject": getattr(exc, "subject", "")})
            for listener in list(bus._error_listeners):
                await listener(exc)

        async def on_disconnect() -> None:
            if not bus.closing:  # a disconnect we asked for is not news
                log.warning("nats disconnected")

        async def on_reconnect() -> None:
            log.info("nats reconnected", extra={"url": str(bus.nc.connected_url)})
            for listener in list(bus._reconnect_listeners):
                await listener()

        options: dict[str, Any] = {
            "servers": servers(url),
            "name": name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "connect_timeout": connect_timeout_s,
            "error_cb": on_error,
            "disconnected_cb": on_disconnect,
            "reconnected_cb": on_reconnect,
            # A large pending buffer per subscription; overflow is a slow consumer (see above).
            "pending_size": 64 * 1024 * 1024,
        }
        if user:
            options.update(user=user, password=password)
        delay = 0.2
        while True:
            try:
                await bus.nc.connect(**options)
                return bus
            except (TimeoutError, nats.errors.NoServersError, OSError) as exc:
                log.warning("nats connect to %s failed (%r); retrying in %.1fs", url, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                bus = cls(Client())

    def on_reconnect(self, listener: Callback) -> None:
        self._reconnect_listeners.append(listener)

    def on_error(self, listener: ErrorCallback) -> None:
        self._error_listeners.append(listener)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> None:
        await self.nc.publish(subject, data, headers=headers)

    async def request(self, subject: str, data: bytes, timeout_s: float = 2.0) -> bytes:
        """Request/reply within timeout_s; raises NoRespondersError or RequestTimeout after it.

        "No responders" is retried until the deadline: the responder may be restarting, and
        nats-server (2.15) can briefly miss a subscription another connection made a moment ago
        (measured: ~1 request in 1000 right after a SUB + PING on the other connection).
        """
        deadline = time.monotonic() + timeout_s
        delay = 0.01
        while True:
            remaining = deadline - time.monotonic()
            try:
                msg = await self.nc.request(subject, data, timeout=max(remaining, 0.01))
                return bytes(msg.data)
            except NoRespondersError:
                if remaining <= delay:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def subscribe(
        self,
        subject: str,
        *,
        queue: str = "",
        pending_msgs_limit: int = 512 * 1024,
        cb: Callable[[Msg], Awaitable[None]] | None = None,
    ) -> Subscription:
        return await self.nc.subscribe(
            subject, queue=queue, cb=cb, pending_msgs_limit=pending_msgs_limit
        )

    async def flush(self, timeout_s: int = 2) -> None:
        await self.nc.flush(timeout=timeout_s)

    async def key_value(
        self,
        bucket: str,
        *,
        history: int = 1,
        create: bool = True,
        replicas: int = 1,
        ready_timeout_s: float = 60.0,
    ) -> KeyValue:
        """Open a file-backed JetStream KV bucket, creating it (with replicas) if asked and missing.

        A JetStream cluster that is still electing its leader answers "unavailable" or not at
        all; that is waited out (up to ready_timeout_s) instead of failing the service's start.
        """
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                return await self._open_kv(bucket, history, create, replicas)
            except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("JetStream not ready for KV %s (%r); retrying", bucket, exc)
                await asyncio.sleep(0.5)

    async def _open_kv(self, bucket: str, history: int, create: bool, replicas: int) -> KeyValue:
        js = self.nc.jetstream()
        try:
            kv = await js.key_value(bucket)
        except BucketNotFoundError:
            if not create:
                raise
            config = KeyValueConfig(
                bucket=bucket, history=history, storage=StorageType.FILE, replicas=replicas
            )
            return await js.create_key_value(config)
        have = (await kv.status()).stream_info.config.num_replicas or 1
        if have != replicas:  # changing an existing stream's replicas is an admin's call
            log.warning(
                "KV bucket %s keeps its %d replicas (config asks for %d; "
                "`nats stream edit KV_%s --replicas %d` changes them)",
                bucket,
                have,
                replicas,
                bucket,
                replicas,
            )
        return kv

    async def close(self) -> None:
        """Drain (flush what we published, finish in-flight handlers), then close."""
        if self.nc.is_closed:
            return
        self.closing = True
        try:
            await self.nc.drain()
        except (nats.errors.ConnectionClosedError, nats.errors.FlushTimeoutError, TimeoutError):
            await self.nc.close()


async def reply(msg: Msg, data: bytes) -> None:
    """Answer a request; a requester that gave up is not our error."""
    if msg.reply:
        await msg.respond(data)
