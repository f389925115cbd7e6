"""The router benchmark's load and its measures: wrk (a Lua script for the POST body), the Python
fallback when wrk is missing, the time-to-first-byte client, and router CPU time from /proc."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from bench.router_stats import WrkResult, cpu_seconds, descendants, parse_wrk, pct, stat_ppid
from bench.router_stats import stat_ticks as ticks_of

# Both kinds through the same routes of every router; the backend answers by path (JSON for
# chat, SSE for completions) since nginx cannot see the body's "stream" field.
KINDS: dict[str, tuple[str, dict[str, object]]] = {
    "json": (
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    ),
    "sse": ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 8, "stream": True}),
}
HZ = os.sysconf("SC_CLK_TCK")


def lua_script(body: dict[str, object]) -> str:
    """wrk's script: every request a POST of this JSON body."""
    text = json.dumps(body, separators=(",", ":"))
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(text)}\n"  # a JSON string literal is a valid Lua string here
        'wrk.headers["Content-Type"] = "application/json"\n'
    )


def run_wrk(
    wrk: str, url: str, script: Path, concurrency: int, duration_s: int, threads: int
) -> WrkResult:
    argv = [wrk, "-t", str(max(1, min(threads, concurrency))), "-c", str(concurrency)]
    argv += ["-d", f"{duration_s}s", "--latency", "--timeout", "10s", "-s", str(script), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    return parse_wrk(done.stdout + done.stderr)


async def _py_load(
    url: str, body: dict[str, object], concurrency: int, duration_s: float
) -> WrkResult:
    latencies: list[float] = []
    failed = [0]
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as s:
        began = time.perf_counter()
        end = began + duration_s

        async def loop() -> None:
            while time.perf_counter() < end:
                sent = time.perf_counter()
                async with s.post(url, json=body) as r:
                    await r.read()
                    failed[0] += r.status != 200
                latencies.append((time.perf_counter() - sent) * 1000)

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        took = time.perf_counter() - began
    return WrkResult(
        requests=len(latencies),
        duration_s=took,
        rps=len(latencies) / took,
        p50_ms=pct(latencies, 0.5),
        p99_ms=pct(latencies, 0.99),
        non_2xx=failed[0],
    )


def run_python(url: str, body: dict[str, object], concurrency: int, duration_s: int) -> WrkResult:
    """The fallback load generator (aiohttp; saturates long before wrk: ~7.5k rps here)."""
    return asyncio.run(_py_load(url, body, concurrency, duration_s))


async def _ttfb(
    url: str, body: dict[str, object], concurrency: int, total: int, budget_s: float
) -> tuple[list[float], int]:
    firsts: list[float] = []
    failed = [0]
    left = [total]
    end = time.perf_counter() + budget_s
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def loop() -> None:
            while left[0] > 0 and time.perf_counter() < end:
                left[0] -= 1
                sent = time.perf_counter()
                async with s.post(url, json=body) as r:
                    chunk = await r.content.readany()
                    first = time.perf_counter()
                    while chunk:  # the rest of the stream, so the connection is reused
                        chunk = await r.content.readany()
                    if r.status != 200:
                        failed[0] += 1
                        continue
                firsts.append((first - sent) * 1000)

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return firsts, failed[0]


def measure_ttfb(
    url: str, concurrency: int, total: int, budget_s: float
) -> tuple[float, float, int, int]:
    """Time to the first body byte of streamed requests (ms): p50, p99, how many, how many
    failed; after a short warm-up (connections opened). At most `budget_s` seconds."""
    path, body = KINDS["sse"]
    asyncio.run(_ttfb(url + path, body, concurrency, max(concurrency * 4, 20), budget_s))
    firsts, failed = asyncio.run(_ttfb(url + path, body, concurrency, total, budget_s))
    if not firsts:
        raise RuntimeError(f"no streamed request through {url} answered 200")
    return pct(firsts, 0.5), pct(firsts, 0.99), len(firsts), failed


def _read_stat(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone
        return None


def process_tree(roots: Sequence[int]) -> list[int]:
    """The roots and their live descendants (a peer's launcher may run its router as a child)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _read_stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat_ppid(stat)
    return descendants(roots, parents)


def sample_ticks(pids: Sequence[int]) -> dict[int, int]:
    return {pid: ticks_of(stat) for pid in pids if (stat := _read_stat(pid)) is not None}


def cpu_during(pids: Sequence[int], before: dict[int, int]) -> float:
    return cpu_seconds(before, sample_ticks(pids), HZ)
