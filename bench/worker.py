"""Benchmark: worker admission-rejection latency when saturated, and HTTP overhead over the engine.

Run: .venv/bin/python bench/worker.py [--requests 2000]
The worker runs in-process (sim engine, no NATS); the client is aiohttp over loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from services.common.run import Running, start_in_process
from services.worker.config import WorkerConfig
from services.worker.engines.base import SamplingParams
from services.worker.engines.sim import SimEngine, SimSettings
from services.worker.main import WorkerService, serve


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def start(**fields: Any) -> tuple[Running[WorkerService], Callable[[], Awaitable[None]]]:
    cfg = WorkerConfig(engine="sim", http_port=0, register=False, log_level="error", **fields)
    worker, stop = await start_in_process(serve, cfg)
    return worker, stop


async def rejection_latency(n: int) -> list[float]:
    worker, stop = await start(max_in_flight=2, max_queue_depth=2, sim_tokens_per_s=5.0)
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 200}
    async with aiohttp.ClientSession() as s:
        hogs = [
            asyncio.create_task(s.post(worker.url + "/v1/chat/completions", json=body))
            for _ in range(4)
        ]
        gate = worker.service.models["sim-model"].gate
        while gate.core.queue_depth < 2:  # noqa: ASYNC110 - waiting for the hogs to be admitted
            await asyncio.sleep(0.01)
        times = []
        for _ in range(n):
            began = time.perf_counter()
            async with s.post(worker.url + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                assert resp.status == 503
            times.append((time.perf_counter() - began) * 1000)
        for hog in hogs:
            hog.cancel()
    await stop()
    return times


async def raw_engine(n: int, concurrency: int, max_tokens: int) -> float:
    engine = SimEngine("m", SimSettings(ttft_s=0.0, tokens_per_s=1e7, max_batch=concurrency))
    params = SamplingParams(max_tokens=max_tokens)
    left = [n]

    async def loop() -> None:
        while left[0] > 0:
            left[0] -= 1
            async for _ in engine.start("<|user|> x\n<|assistant|>", params):
                pass

    began = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return (time.perf_counter() - began) / n * concurrency * 1e6


async def through_http(n: int, concurrency: int, max_tokens: int, stream: bool) -> float:
    worker, stop = await start(sim_ttft_s=0.0, sim_tokens_per_s=1e7, sim_max_batch=concurrency)
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    left = [n]
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def loop() -> None:
            while left[0] > 0:
                left[0] -= 1
                async with s.post(worker.url + "/v1/chat/completions", json=body) as resp:
                    await resp.read()

        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    await stop()
    return elapsed / n * concurrency * 1e6


async def main(n: int) -> None:
    times = await rejection_latency(min(n, 500))
    print("admission rejection under saturation (queue full), over HTTP")
    print(f"{'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    print(
        f"{len(times):>9} {statistics.median(times):>8.2f} {pct(times, 0.99):>8.2f}"
        f" {max(times):>8.2f}"
    )
    print()
    print("per-request time: raw engine loop vs. the worker's HTTP API (client in-process too)")
    header = ("conc", "tokens", "mode", "engine us", "http us", "overhead us")
    print("{:>4} {:>6} {:>6} {:>10} {:>9} {:>12}".format(*header))
    for concurrency in (1, 16):
        for max_tokens in (1, 16):
            engine_us = await raw_engine(n, concurrency, max_tokens)
            for stream in (False, True):
                http_us = await through_http(n, concurrency, max_tokens, stream)
                mode = "sse" if stream else "json"
                print(
                    f"{concurrency:>4} {max_tokens:>6} {mode:>6} {engine_us:>10.0f} {http_us:>9.0f}"
                    f" {http_us - engine_us:>12.0f}"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    asyncio.run(main(parser.parse_args().requests))
