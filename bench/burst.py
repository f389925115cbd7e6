"""Benchmark: refusal latency when the fleet is full, one request at a time vs. N at once.

Run: .venv/bin/python -m bench.burst [--sizes 100,300,400] [--runs 3] [--steady 200]
Two cases, each on its own stack (NATS, registry, capacity, one sim worker, a router; every
service its own process, logging as it does by default): "gateway" fills the router's gateway
(its slots and its queue), so the router refuses; "worker" opens the gateway (a capacity
override) and fills the worker's slots: the router, which knows from the heartbeat that the
worker is full, refuses (before #16 it forwarded and relayed the worker's refusal). Each
burst opens all N connections first, then writes every request at once; a latency runs from a
request's write to the end of its response. The burst/steady column is the ratio of p99s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from bench.router import free_port, pct, spawn

BODY = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
# Streamed, so their response heads come at once and no upstream header timeout frees a slot.
HOG = {**BODY, "max_tokens": 4000, "stream": True}
HOGS = 6  # gateway: 2 slots + 4 queued at the router; worker: 6 slots on the worker


def request_bytes(body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


REQUEST = request_bytes(BODY)


class Conn:
    """One keep-alive client connection over a raw socket: write now, read the answer later."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, data: bytes = REQUEST) -> float:
        self.writer.write(data)
        return time.perf_counter()

    async def answer(self) -> tuple[int, dict[str, str], dict[str, object]]:
        """Status, headers (lower-case names) and JSON body of one whole response."""
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(h.lower().split(": ", 1) for h in head[1:] if h)
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        envelope = json.loads(body) if body else {}
        return int(head[0].split()[1]), headers, envelope

    def close(self) -> None:
        self.writer.close()


async def timed(conn: Conn) -> tuple[float, int, str]:
    """ms from this request's write to the end of its response, its status and origin."""
    sent = conn.send()
    status, headers, envelope = await conn.answer()
    ms = (time.perf_counter() - sent) * 1000
    # what a refusal must be however many come at once: 503, Retry-After, the envelope
    assert status == 503, (status, envelope)
    assert "retry-after" in headers, headers
    assert "error" in envelope, envelope
    return ms, status, headers.get("x-switchboard-origin", "?")


async def burst(port: int, n: int) -> tuple[list[float], Counter[str]]:
    conns = await asyncio.gather(*(Conn.open(port) for _ in range(n)))
    try:
        results = await asyncio.gather(*(timed(c) for c in conns))
    finally:
        for conn in conns:
            conn.close()
    return [ms for ms, _, _ in results], Counter(origin for _, _, origin in results)


async def steady(port: int, n: int, pause_s: float) -> tuple[list[float], Counter[str]]:
    conn = await Conn.open(port)
    times: list[float] = []
    origins: Counter[str] = Counter()
    try:
        for _ in range(n):
            await asyncio.sleep(pause_s)
            ms, _, origin = await timed(conn)
            times.append(ms)
            origins[origin] += 1
    finally:
        conn.close()
    return times, origins


async def wait_for(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if await check():
                return
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


class Stack:
    """NATS, registry, capacity (override: the router's gateway limit), a sim worker, a router."""

    def __init__(self, tmp: Path, capacity: int, worker_slots: int, gateway_queue: int) -> None:
        self.tmp, self.capacity = tmp, capacity
        self.worker_slots, self.gateway_queue = worker_slots, gateway_queue
        self.procs: list[object] = []
        self.port = free_port()
        self.hogs: list[Conn] = []

    async def start(self) -> None:
        from services.cli.natsd import NatsServer

        nats = NatsServer(self.tmp / "js")
        self.procs.append(nats)
        env = {"NATS_URL": nats.start(), "SUBJECT_PREFIX": "burst"}
        logs = self.tmp

        def run(service: str, *flags: str) -> None:
            argv = (sys.executable, "-m", f"services.{service}", "--http-port", *flags)
            self.procs.append(spawn(*argv, env=env, log=logs / f"{service}.log"))

        run("registry", "0")
        run("capacity", "0", "--override", str(self.capacity))
        worker = (str(free_port()), "--engine", "sim", "--sim-tokens-per-s", "1")
        run("worker", *worker, "--max-in-flight", str(self.worker_slots), "--max-queue-depth", "0")
        run(
            "router",
            str(self.port),
            "--gateway-queue-depth",
            str(self.gateway_queue),
            "--gateway-max-wait-s",
            "3600",
        )
        base = f"http://127.0.0.1:{self.port}"
        async with aiohttp.ClientSession() as s:

            async def ready() -> bool:
                async with s.get(base + "/healthz") as r:
                    health = await r.json()
                async with s.get(base + "/v1/models") as r:
                    models = (await r.json()).get("data", [])
                return bool(health.get("capacity_known")) and bool(models)

            await wait_for(ready, "the router to see the worker and the capacity")

    async def fill(self, origin: str) -> None:
        """Hogs take every slot and queue place; then a request is refused by `origin`."""
        for _ in range(HOGS):
            conn = await Conn.open(self.port)
            conn.send(request_bytes(HOG))
            self.hogs.append(conn)

        async def refused() -> bool:
            conn = await Conn.open(self.port)
            try:
                conn.send()
                status, headers, _ = await conn.answer()
            finally:
                conn.close()
            return status == 503 and headers.get("x-switchboard-origin") == origin

        await wait_for(refused, f"refusals from the {origin}")

    async def stop(self) -> None:
        for conn in self.hogs:
            conn.close()
        for proc in self.procs:
            if isinstance(proc, subprocess.Popen):
                proc.kill()  # no drain: hogs would hold it for the worker's drain timeout
            else:
                proc.stop()  # type: ignore[attr-defined]
        for proc in self.procs:
            if isinstance(proc, subprocess.Popen):
                proc.wait(10)


def row(case: str, n: int | str, times: list[float], origins: Counter[str], base: float) -> str:
    p99 = pct(times, 0.99)
    seen = ",".join(f"{k}:{v}" for k, v in sorted(origins.items()))
    return (
        f"{case:<8} {n!s:>6} {statistics.median(times):>7.2f} {p99:>7.2f} {max(times):>7.2f}"
        f" {p99 / base:>12.1f}  {seen}"
    )


async def run_case(
    case: str, tmp: Path, sizes: list[int], runs: int, steady_n: int, report: Callable[[str], None]
) -> None:
    if case == "gateway":  # 2 gateway slots (both hogs run on the worker) and 4 queued hogs
        stack, pause_s = Stack(tmp / case, capacity=2, worker_slots=8, gateway_queue=4), 0.0
    else:  # the gateway lets all through; the worker's 6 slots are the hogs', it queues none
        stack, pause_s = Stack(tmp / case, capacity=65535, worker_slots=HOGS, gateway_queue=0), 0.0
    (tmp / case).mkdir()
    try:
        await stack.start()
        # Both cases are refused by the router: since the deadline-aware gateway (#16) it does
        # not forward to a worker whose heartbeat says it is full; with no gateway queue
        # (worker case) it refuses at once instead of letting the worker refuse.
        await stack.fill("router")
        cooldown_s = 0.0
        times, origins = await steady(stack.port, steady_n, pause_s)
        base = pct(times, 0.99)
        report(row(case, "steady", times, origins, base))
        for n in sizes:
            for _ in range(runs):
                await asyncio.sleep(max(cooldown_s, 0.3))  # closed connections wind down
                times, origins = await burst(stack.port, n)
                report(row(case, n, times, origins, base))
    finally:
        await stack.stop()


async def main(sizes: list[int], runs: int, steady_n: int, cases: list[str]) -> None:
    print(
        f"{'case':<8} {'N':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'burst/steady':>12}"
        "  refused by"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            await run_case(case, Path(tmp), sizes, runs, steady_n, lambda line: print(line))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,300,400")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steady", type=int, default=200)
    parser.add_argument("--cases", default="gateway,worker")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    asyncio.run(main(sizes, args.runs, args.steady, args.cases.split(",")))
