"""What a registry command would do, as a value (reply, events, KV writes, beats). Pure, no I/O.

The core plans an Effect without touching its state; the shell persists the writes and only then
commits the Effect to memory and publishes its events, so a failed write leaves no trace.
"""

from __future__ import annotations

import hashlib

import msgspec

from schemas.registry import CommandError, CommandReply, ErrorCode, RegistryEvent, WorkerRecord


def url_key(url: str) -> str:
    """KV key for the URL index (URLs hold characters KV keys do not allow)."""
    return "urls." + hashlib.sha256(url.encode()).hexdigest()[:40]


def record_key(worker_id: str) -> str:
    return f"workers.{worker_id}"


class PutRecord(msgspec.Struct, frozen=True):
    record: WorkerRecord
    create: bool  # True: the key must not exist yet (KV create); False: update at the cached rev


class DeleteRecord(msgspec.Struct, frozen=True):
    worker_id: str


class ClaimUrl(msgspec.Struct, frozen=True):
    url: str
    worker_id: str  # KV create: fails if another worker holds the URL


class ReleaseUrl(msgspec.Struct, frozen=True):
    url: str


Write = PutRecord | DeleteRecord | ClaimUrl | ReleaseUrl


class Effect(msgspec.Struct, frozen=True):
    """A command's planned effect: the reply, the events that describe the change in order, the
    KV writes that persist it, and the liveness clocks it (re)starts. A read, a no-op or a
    refusal is an Effect with a reply only."""

    reply: CommandReply
    events: tuple[RegistryEvent, ...] = ()
    writes: tuple[Write, ...] = ()
    # (worker id, time): liveness clocks this effect (re)starts when committed
    beats: tuple[tuple[str, float], ...] = ()


def refusal(code: ErrorCode, message: str, field: str | None = None) -> Effect:
    """An Effect that changes nothing and answers the error."""
    return Effect(reply=CommandError(code=code, message=message, field=field))
