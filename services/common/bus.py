"""The one typed wrapper around nats-py: connect (bounded), publish, request, subscribe, KV.

Connection trouble is surfaced to the service through callbacks, because NATS core drops messages
silently on a slow consumer or a reconnect; sequence-tracking consumers treat both as a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from schemas import codec
from schemas.subjects import DEFAULT_INBOX, SubjectError, inbox_prefix
from services.common.backoff import Backoff
from services.common.errors import ServiceError
from services.common.logging import clip
from services.common.metrics import BusMetrics
from services.common.sampled_log import SampledLog

log = logging.getLogger(__name__)
T = TypeVar("T", covariant=True)


class Decoder(Protocol[T]):
    def decode(self, data: bytes) -> T: ...


_rejects = SampledLog(log)


def decode_or_reject(decoder: Decoder[T], data: bytes, metrics: BusMetrics, label: str) -> T | None:
    """The message, or None after counting it under `label` and logging why (sampled, clipped):
    a bad message costs a line and a count, never the subscription."""
    try:
        return decoder.decode(data)
    except codec.DecodeError as exc:
        metrics.rejected.labels(label).inc()
        _rejects.info("bad message ignored", {"subject": label, "error": clip(str(exc))})
        return None


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


class NatsConnectError(ServiceError):
    """The first connection to NATS failed: nothing answered in time, or it refused us."""


def user_of(url: str) -> str:
    """The user name in a NATS URL (the first server that names one), "" when there is none or
    the URL holds a token (no password): a token names no user."""
    for server in url.split(","):
        parts = urlsplit(server.strip())
        if parts.username and parts.password is not None:
            return unquote(parts.username)
    return ""


def mask_url(url: str) -> str:
    """The URL (or comma-separated URLs) with every password or token replaced by ***."""
    return re.sub(r"://([^:@/,]*)(:[^@/,]*)?@", _mask_userinfo, url)


def _mask_userinfo(match: re.Match[str]) -> str:
    user, secret = match.group(1), match.group(2)
    return f"://{user}:***@" if secret is not None else "://***@"  # no colon: a token


def _inbox_for(user: str) -> str:
    try:
        return inbox_prefix(user)
    except SubjectError:  # a user name no subject can hold: a NATS we did not configure
        return DEFAULT_INBOX


def _is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or (
        "authorization violation" in str(exc).lower()
    )


def _reason(exc: BaseException | None, waited_s: float) -> str:
    if exc is None:
        return f"no connection within {waited_s:g}s"
    if _is_auth_error(exc):
        return "authorization violation (wrong user or password)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, TimeoutError | nats.errors.TimeoutError):
        return f"no answer within {waited_s:g}s (is it a NATS server?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc).removeprefix("nats: ") or type(exc).__name__


def connect_failure(url: str, source: str, waited_s: float, failures: list[BaseException]) -> str:
    """Pure: one line saying which NATS we could not reach, why, and where its URL came from."""
    auth = [e for e in failures if _is_auth_error(e)]
    last = auth[-1] if auth else (failures[-1] if failures else None)
    where = f" ({source})" if source else ""
    return f"cannot reach NATS at {mask_url(url)}{where}: {_reason(last, waited_s)}"


async def _abandon(bus: Bus, attempt: asyncio.Future[Any]) -> None:
    """Stop a first connect that is still retrying and release what it holds."""
    bus.closing = True
    attempt.cancel()
    await asyncio.wait({attempt}, timeout=1.0)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(bus.nc.close(), 1.0)


class Bus:
    """A connected NATS client plus the callbacks a service registered for its trouble."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._reconnect_listeners: list[Callback] = []
        self._error_listeners: list[ErrorCallback] = []
        self.closing = False
        self.ready = False  # the first connect succeeded; trouble after it is logged

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        *,
        first_connect_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        source: str = "",
        user: str = "",
        password: str = "",
    ) -> Bus:
        """Connect within first_connect_s (else NatsConnectError), then reconnect forever.

        Refused credentials fail at once: retrying cannot fix them. source says where the URL
        came from (e.g. "credentials from .switchboard/operator-url") for the error message.
        Replies (requests, JetStream) arrive under the user's own inbox prefix, the only one its
        permissions let it subscribe to (natsauth).
        """
        bus = cls(Client())
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failures: list[BaseException] = []

        async def on_error(exc: Exception) -> None:
            if not bus.ready:  # not connected yet: one line at the end, not one per retry
                failures.append(exc)
                if _is_auth_error(exc) and not first.done():
                    first.set_result(None)
                return
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
            "connect_timeout": min(connect_timeout_s, first_connect_s),
            "error_cb": on_error,
            "disconnected_cb": on_disconnect,
            "reconnected_cb": on_reconnect,
            # A large pending buffer per subscription; overflow is a slow consumer (see above).
            "pending_size": 64 * 1024 * 1024,
        }
        if user:
            options.update(user=user, password=password)
        options["inbox_prefix"] = _inbox_for(user or user_of(url))
        # nats-py retries a first connect forever with these options; the deadline and the
        # credentials check bound it here.
        attempt = asyncio.ensure_future(bus.nc.connect(**options))
        try:
            await asyncio.wait(
                {attempt, first}, timeout=first_connect_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not attempt.done():
                await _abandon(bus, attempt)
            first.cancel()
        error = None if attempt.cancelled() else attempt.exception()
        if not attempt.cancelled() and error is None:
            bus.ready = True
            return bus
        raise NatsConnectError(
            connect_failure(url, source, first_connect_s, [*failures, *([error] if error else [])])
        )

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
        pace = Backoff(first_s=0.01, max_s=0.5)
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await self._request_once(subject, data, max(remaining, 0.01))
            except NoRespondersError:
                if remaining <= pace.delay:
                    raise
            await pace.wait()

    async def _request_once(self, subject: str, data: bytes, timeout_s: float) -> bytes:
        """One try of request(); the seam an in-memory bus (tests/memory_bus.py) replaces."""
        msg = await self.nc.request(subject, data, timeout=timeout_s)
        return bytes(msg.data)

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
        pace = Backoff(first_s=0.1, max_s=1.0)
        while True:
            try:
                return await self._open_kv(bucket, history, create, replicas)
            except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning(
                    "JetStream not ready for KV %s (%r); retrying in %.1fs", bucket, exc, pace.delay
                )
                await pace.wait()

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
