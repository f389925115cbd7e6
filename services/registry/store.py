"""Registry persistence in JetStream KV: records, URL claims and the event sequence, all by CAS.

Every write is a KV create or an update/delete at the revision we last saw, so two registry
processes can never both claim one URL or silently overwrite each other's record: the loser gets
StoreConflict, reloads, and retries. Nothing is sent while NATS is disconnected (StoreUnavailable):
nats-py would buffer it and send it after the reconnect, long after the caller gave up.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from schemas import codec
from schemas.registry import WorkerRecord
from services.common.bus import (
    KV,
    Bus,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
)
from services.registry.effects import (
    ClaimUrl,
    DeleteRecord,
    PutRecord,
    ReleaseUrl,
    Write,
    record_key,
    url_key,
)

META_KEY = "meta.sequence"


class SequenceMeta(msgspec.Struct, frozen=True):
    epoch: int
    seq: int


class StoreConflict(Exception):
    """A CAS write lost to a concurrent writer; the caller reloads and retries."""


class UrlTaken(StoreConflict):
    """Another live worker holds this URL in KV (our in-memory view was stale)."""


class StoreUnavailable(Exception):
    """NATS is disconnected: the operation was refused before it sent anything more."""


class RegistryStore:
    def __init__(self, kv: KV, online: Callable[[], bool] = lambda: True) -> None:
        self.kv = kv
        self.online = online
        self.revs: dict[str, int] = {}  # key -> the KV revision we last read or wrote
        self.meta = SequenceMeta(epoch=0, seq=0)

    @classmethod
    async def open(cls, bus: Bus, bucket: str, *, replicas: int = 1) -> RegistryStore:
        kv = await bus.key_value(bucket, history=1, replicas=replicas)
        return cls(kv, online=lambda: bus.connected)

    def _check_online(self) -> None:
        if not self.online():
            raise StoreUnavailable("not connected to NATS")

    async def load(self) -> list[WorkerRecord]:
        """Read every record and the sequence position; start a new epoch if there is none."""
        self._check_online()
        self.revs = {}
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            keys = []
        records = []
        for key in keys:
            entry = await self._get(key)
            if entry is None:
                continue
            value, rev = entry
            self.revs[key] = rev
            if key.startswith("workers."):
                records.append(codec.decode(value, WorkerRecord))
            elif key == META_KEY:
                self.meta = codec.decode(value, SequenceMeta)
        if META_KEY not in self.revs:
            meta = SequenceMeta(epoch=time.time_ns(), seq=0)
            try:
                self.revs[META_KEY] = await self.kv.create(META_KEY, codec.encode(meta))
                self.meta = meta
            except KeyWrongLastSequenceError:  # another registry created it just now
                return await self.load()
        return records

    async def _get(self, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if entry.value is None:
            return None
        return bytes(entry.value), int(entry.revision or 0)

    async def reserve(self, count: int) -> int:
        """Advance the persisted seq by count; return the first reserved seq."""
        for _ in range(10):
            self._check_online()
            new = SequenceMeta(epoch=self.meta.epoch, seq=self.meta.seq + count)
            try:
                self.revs[META_KEY] = await self.kv.update(
                    META_KEY, codec.encode(new), last=self.revs.get(META_KEY, 0)
                )
            except KeyWrongLastSequenceError:
                entry = await self._get(META_KEY)
                if entry is not None:
                    self.meta = codec.decode(entry[0], SequenceMeta)
                    self.revs[META_KEY] = entry[1]
                continue
            self.meta = new
            return new.seq - count + 1
        raise StoreConflict("sequence update kept losing to another registry")

    async def apply(self, writes: tuple[Write, ...]) -> None:
        for write in writes:
            self._check_online()
            match write:
                case ClaimUrl(url=url, worker_id=worker_id):
                    await self._claim(url_key(url), worker_id)
                case PutRecord(record=record, create=create):
                    key = record_key(record.id)
                    data = codec.encode(record)
                    try:
                        if create:
                            self.revs[key] = await self.kv.create(key, data)
                        else:
                            self.revs[key] = await self.kv.update(
                                key, data, last=self.revs.get(key, 0)
                            )
                    except KeyWrongLastSequenceError as exc:
                        raise StoreConflict(f"record {record.id} changed underneath us") from exc
                case DeleteRecord(worker_id=worker_id):
                    await self._delete(record_key(worker_id))
                case ReleaseUrl(url=url):
                    await self._delete(url_key(url))

    async def _claim(self, key: str, worker_id: str) -> None:
        for _ in range(3):
            self._check_online()
            try:
                self.revs[key] = await self.kv.create(key, worker_id.encode())
                return
            except KeyWrongLastSequenceError:
                entry = await self._get(key)
                if entry is None:
                    continue
                owner, rev = entry[0].decode(), entry[1]
                if owner == worker_id:
                    self.revs[key] = rev
                    return
                if await self._get(record_key(owner)) is not None:
                    raise UrlTaken(f"url claimed by {owner}") from None
                # A claim left by a registry that crashed before writing the record: reclaim.
                try:
                    await self.kv.delete(key, last=rev)
                except KeyWrongLastSequenceError:
                    continue
        raise StoreConflict(f"could not claim {key}")

    async def _delete(self, key: str) -> None:
        try:
            await self.kv.delete(key, last=self.revs.get(key))
        except KeyWrongLastSequenceError as exc:
            raise StoreConflict(f"{key} changed underneath us") from exc
        self.revs.pop(key, None)
