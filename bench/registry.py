"""Benchmark: registry operations per second (register, set_status) over NATS, printed as a table.

Run: .venv/bin/python bench/registry.py [--ops 2000] [--concurrency 1,16,64]
Starts its own nats-server (JetStream in a temp dir) and an in-process registry.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from schemas.registry import Command, RegisterRequest, SetStatusRequest, WorkerSpec, WorkerStatus
from schemas.subjects import Subjects
from services.cli.natsd import NatsServer
from services.common.bus import Bus
from services.common.run import start_in_process
from services.registry.client import RegistryClient
from services.registry.config import RegistryConfig
from services.registry.main import serve


def bench_url(n: int) -> str:
    return f"http://10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}:8000"


async def run_ops(client: RegistryClient, requests: list[Command], concurrency: int) -> float:
    queue = list(reversed(requests))

    async def worker() -> None:
        while queue:
            await client.call(queue.pop())

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(requests) / (time.perf_counter() - start)


async def main(ops: int, levels: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "js")
        url = server.start()
        try:
            cfg = RegistryConfig(
                nats_url=url, subject_prefix="bench", http_port=0, log_level="error"
            )
            _, stop_registry = await start_in_process(serve, cfg)
            bus = await Bus.connect(url, "bench")
            client = RegistryClient(bus, Subjects.for_prefix("bench"))
            print(f"{'operation':<12} {'concurrency':>11} {'ops':>6} {'ops/s':>9}")
            base = 0
            for level in levels:
                regs: list[Command] = [
                    RegisterRequest(worker=WorkerSpec(url=bench_url(base + i), models=("m",)))
                    for i in range(ops)
                ]
                base += ops
                rate = await run_ops(client, regs, level)
                print(f"{'register':<12} {level:>11} {ops:>6} {rate:>9.0f}")
                ids = [r.id for r in (await client.snapshot()).workers]
                flips: list[Command] = [
                    SetStatusRequest(
                        id=ids[i % len(ids)],
                        status=WorkerStatus.READY if i % 2 == 0 else WorkerStatus.NOT_READY,
                    )
                    for i in range(ops)
                ]
                rate = await run_ops(client, flips, level)
                print(f"{'set_status':<12} {level:>11} {ops:>6} {rate:>9.0f}")
            await bus.close()
            await stop_registry()
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,16,64")
    args = parser.parse_args()
    asyncio.run(main(args.ops, [int(c) for c in args.concurrency.split(",")]))
