"""Start a registry in-process for a test, and record its event stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from schemas import codec
from schemas.base import Envelope
from schemas.registry import RegistryBeacon, RegistryEvent
from schemas.subjects import Subjects
from services.common.bus import Bus, Message
from services.common.run import Running, start_in_process
from services.registry.config import RegistryConfig
from services.registry.main import serve
from services.registry.shell import Registry


async def start_registry(
    nats_url: str, prefix: str, **overrides: Any
) -> tuple[Running[Registry], Callable[[], Awaitable[None]]]:
    """Start a registry in-process; returns it and an idempotent stop function."""
    cfg = RegistryConfig(
        nats_url=nats_url, subject_prefix=prefix, http_port=0, log_format="text", **overrides
    )
    handle, stop = await start_in_process(serve, cfg)
    return handle, stop


@contextlib.asynccontextmanager
async def running_registry(
    nats_url: str, prefix: str, **overrides: Any
) -> AsyncIterator[Running[Registry]]:
    reg, stop = await start_registry(nats_url, prefix, **overrides)
    try:
        yield reg
    finally:
        await stop()


class EventLog:
    """Everything published on <prefix>.registry.events, beacons kept apart."""

    def __init__(self) -> None:
        self.events: list[Envelope[RegistryEvent]] = []
        self.beacons: list[Envelope[RegistryEvent]] = []

    async def on_msg(self, msg: Message) -> None:
        env = codec.registry_event_decoder.decode(msg.data)
        (self.beacons if isinstance(env.body, RegistryBeacon) else self.events).append(env)

    def bodies(self) -> list[RegistryEvent]:
        return [e.body for e in self.events]

    def assert_contiguous(self) -> None:
        seqs = [e.seq for e in self.events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True, seqs


async def record_events(bus: Bus, prefix: str) -> EventLog:
    log = EventLog()
    await bus.subscribe(Subjects.for_prefix(prefix).registry_events, cb=log.on_msg)
    await bus.flush()
    return log
