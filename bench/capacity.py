"""Benchmark: registry events/s the capacity service absorbs, and event -> view latency p50/p99.

Run: .venv/bin/python bench/capacity.py [--events 20000] [--latency-samples 300]
Starts its own nats-server and an in-process capacity service. A small stand-in answers the
registry snapshot (empty, epoch 1, seq 0) so the bench controls the event stream exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import msgspec

from schemas import codec
from schemas.base import Envelope
from schemas.registry import (
    RegistryEvent,
    RegistrySnapshot,
    WorkerRecord,
    WorkerRegistered,
    WorkerStatus,
    WorkerStatusChanged,
)
from schemas.subjects import Subjects
from services.capacity.config import CapacityConfig
from services.capacity.main import serve
from services.cli.natsd import NatsServer
from services.common.bus import Bus, Message, reply
from services.common.run import start_in_process

S = WorkerStatus


def flip(record: WorkerRecord, n: int) -> WorkerStatusChanged:
    old, new = (S.READY, S.NOT_READY) if n % 2 else (S.NOT_READY, S.READY)
    return WorkerStatusChanged(worker_id=record.id, old_status=old, new_status=new, revision=n + 1)


async def main(events: int, samples: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "js")
        url = server.start()
        bus = await Bus.connect(url, "bench")
        subjects = Subjects.for_prefix("bench")

        # The stand-in's snapshot always reflects the stream sent so far, like the registry's.
        state: dict[str, WorkerRecord] = {}

        async def snapshot(msg: Message) -> None:
            snap = RegistrySnapshot(epoch=1, seq=seq, workers=tuple(state.values()))
            await reply(msg, codec.encode(snap))

        await bus.subscribe(subjects.registry_snapshot, cb=snapshot)
        views: dict[int, float] = {}
        seq = 0

        arrived = asyncio.Event()

        async def on_view(msg: Message) -> None:
            now = time.perf_counter()
            views[codec.capacity_view_decoder.decode(msg.data).body.registry_seq] = now
            arrived.set()

        await bus.subscribe(subjects.capacity_view, cb=on_view)
        await bus.flush()
        cfg = CapacityConfig(
            nats_url=url,
            subject_prefix="bench",
            http_port=0,
            log_level="error",
            checkpoint_interval_s=3600,
        )
        cap, stop_capacity = await start_in_process(serve, cfg)
        await cap.service.follower.synced.wait()

        async def send(body: RegistryEvent) -> None:
            nonlocal seq
            seq += 1
            if isinstance(body, WorkerRegistered):
                state[body.worker.id] = body.worker
            elif isinstance(body, WorkerStatusChanged):
                old = state[body.worker_id]
                state[old.id] = msgspec.structs.replace(
                    old, status=body.new_status, revision=body.revision
                )
            env = Envelope(source="registry", epoch=1, seq=seq, sent_at=time.time(), body=body)
            await bus.publish(subjects.registry_events, codec.encode(env))

        record = WorkerRecord(
            id="w0",
            url="http://w0:1",
            models=("m",),
            status=S.READY,
            revision=1,
            max_running_requests=8,
        )
        await send(WorkerRegistered(worker=record))

        # Throughput: a burst of status flips, as fast as we can publish them.
        begin = time.perf_counter()
        for n in range(events):
            await send(flip(record, n))
        # The mirror's position lives in another task; a 1 ms poll only bounds the end of the burst.
        while cap.service.follower.mirror.position[1] < seq:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        absorb = events / (time.perf_counter() - begin)
        resyncs = sum(
            cap.service.metrics.resnapshots.labels(reason)._value.get()
            for reason in ("gap", "queue_overflow", "slow_consumer")
        )

        # Latency: one event at a time; each flip changes capacity so each yields a view.
        latencies = []
        for n in range(samples):
            sent_at = time.perf_counter()
            await send(flip(record, events + n))
            while True:
                arrived.clear()
                if seq in views:
                    break
                await arrived.wait()
            latencies.append((views[seq] - sent_at) * 1000)
        latencies.sort()
        p50 = statistics.median(latencies)
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(f"{'metric':<32} {'value':>12}")
        print(f"{'events absorbed/s (burst)':<32} {absorb:>12.0f}")
        print(f"{'burst size':<32} {events:>12}")
        print(f"{'re-snapshots in burst':<32} {resyncs:>12.0f}")
        print(f"{'event -> view p50 (ms)':<32} {p50:>12.2f}")
        print(f"{'event -> view p99 (ms)':<32} {p99:>12.2f}")
        await stop_capacity()
        await bus.close()
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--latency-samples", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.latency_samples))
