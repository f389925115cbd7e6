"""Router shell: follows registry events, heartbeats, prefix-cache events and capacity views."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable

from schemas import codec
from schemas.dashboard import FleetSnapshot
from schemas.subjects import Subjects
from services.common.bus import Bus, Message, decode_or_reject
from services.registry.follower import RegistryFollower
from services.router.core import FleetView
from services.router.gateway import Gateway
from services.router.kv import Applied
from services.router.metrics import RouterMetrics
from services.router.policy import PolicyName


class Changes:
    """Wakes every waiter when what the router knows changes (the dashboard's live feed)."""

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()
        self._waited = False  # someone waits on _event: a heartbeat must not make one for nobody

    def notify(self) -> None:
        self.version += 1
        if self._waited:
            self._event.set()
            self._event, self._waited = asyncio.Event(), False  # later waiters: the next change

    async def wait(self, timeout_s: float, since: int) -> None:
        """Until a change after version `since` (at once if one happened already) or timeout_s."""
        if self.version != since:
            return
        event, self._waited = self._event, True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await event.wait()


class RouterShell:
    """The router's I/O around its pure FleetView: registry records (through the shared
    follower), heartbeats and workers' KvBlocks in; the gateway, which follows capacity views;
    change news out."""

    def __init__(
        self,
        bus: Bus,
        subjects: Subjects,
        metrics: RouterMetrics,
        *,
        queue_depth: int,
        max_wait_s: float,
        capacity_share: float = 1.0,
        checkpoint_interval_s: float = 5.0,
        policy: PolicyName = "cost",
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus, self.subjects, self.metrics, self.clock = bus, subjects, metrics, clock
        # Each router draws its own ties, so routers sharing one view of the fleet do not herd.
        self.view = FleetView(policy, draw=(rng or random.Random()).random)
        self.changes = Changes()
        self.gateway = Gateway(
            bus,
            subjects,
            metrics,
            self.changes.notify,
            queue_depth=queue_depth,
            max_wait_s=max_wait_s,
            capacity_share=capacity_share,
        )
        self.follower = RegistryFollower(
            bus,
            subjects,
            self._on_records,
            bus_metrics=metrics.bus,
            checkpoint_interval_s=checkpoint_interval_s,
        )
        # Staleness moves with the clock, not with events: counted when scraped, never per event.
        metrics.stale.set_function(lambda: self.view.stale_count(self.clock()))

    async def start(self) -> None:
        """Subscribe; main.py then runs follower.run() and gateway.fetch_capacity() as loops."""
        await self.follower.start()
        await self.bus.subscribe(self.subjects.load_all, cb=self._on_load)
        await self.bus.subscribe(self.subjects.kv_all, cb=self._on_kv)
        await self.gateway.start()
        await self.bus.flush()

    @property
    def synced(self) -> bool:
        """The registry snapshot is applied: the router knows the fleet."""
        return self.follower.synced.is_set()

    @property
    def draining(self) -> bool:
        return self.gateway.draining

    def heard(self) -> dict[str, int]:
        """How much of the fleet the router knows: workers on record, Ready ones, and Ready ones
        that send heartbeats but have no fresh one here (`up` waits for none of those before it
        says the stack is up)."""
        view = self.view
        return {
            "workers": len(view.records),
            "ready_workers": view.ready_count(),
            "ready_without_heartbeat": view.waiting_for(self.clock()),
        }

    def drain(self) -> None:
        """New requests: 503; in-flight and queued ones finish."""
        self.gateway.drain()

    async def _on_records(self) -> None:
        mirror, view = self.follower.mirror, self.view
        changed = mirror.take_changes()
        # One event changes one record: the view takes that one (O(its models)); a snapshot
        # (changed None) replaces them all. The view keeps its own dict: the mirror's moves on.
        if changed is None:
            view.set_records(dict(mirror.records))
        else:
            for worker_id in changed:
                record = mirror.records.get(worker_id)
                if record is None:
                    view.drop_record(worker_id)
                else:
                    view.set_record(record)
        self.gateway.fleet_moved()
        self.changes.notify()

    async def _on_load(self, msg: Message) -> None:
        self._take_load(msg)
        # nats-py runs this subscription's queued messages back to back without yielding: a
        # burst of heartbeats (a fleet started together beats in step) would hold a registry
        # event queued behind it for the whole burst. Yield, so the event goes in between.
        await asyncio.sleep(0)

    def _take_load(self, msg: Message) -> None:
        env = decode_or_reject(codec.load_decoder, msg.data, self.metrics.bus, "load")
        if env is None:
            return
        # Only the record's owner speaks for it: nats-server lets only that NATS user publish
        # on <p>.load.<principal>.*, and a record names its owner.
        parsed = self.subjects.parse_load(msg.subject)
        record = self.view.records.get(env.body.worker_id)
        if parsed is None or parsed[1] != env.body.worker_id:
            self.metrics.bus.rejected.labels("load").inc()
            return
        if record is None:  # not ours to judge yet: the next heartbeat comes within an interval
            return
        if record.owner != parsed[0]:
            self.metrics.bus.rejected.labels("load.not_owner").inc()
            return
        if self.view.heartbeat(env.body.worker_id, env.epoch, env.seq, env.body, self.clock()):
            # One of its replicas may have room now for a request waiting here.
            self.gateway.fleet_moved(record.models)
            self.changes.notify()

    async def _on_kv(self, msg: Message) -> None:
        env = decode_or_reject(codec.kv_decoder, msg.data, self.metrics.bus, "kv")
        if env is None:
            return
        # As heartbeats: only the record's owner speaks for its cache.
        parsed = self.subjects.parse_kv(msg.subject)
        record = self.view.records.get(env.body.worker_id)
        if parsed is None or parsed[1] != env.body.worker_id:
            self.metrics.bus.rejected.labels("kv").inc()
            return
        if record is None:  # not ours to judge yet: its next full snapshot brings us in step
            return
        if record.owner != parsed[0]:
            self.metrics.bus.rejected.labels("kv.not_owner").inc()
            return
        if self.view.caches.apply(env.epoch, env.seq, env.body) is Applied.RESYNC:
            self.metrics.kv_resyncs.inc()

    def snapshot(self) -> FleetSnapshot:
        """What /dashboard shows."""
        return self.view.snapshot(
            self.clock(),
            self.gateway.capacity,
            self.gateway.loads(),
            self.follower.mirror.position,
            time.time(),
        )
