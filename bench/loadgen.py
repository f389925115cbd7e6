"""Open-loop streaming client of the routing benchmark, and the numbers it reports per target.

Each request of a schedule is sent at its time whatever came back before (one asyncio task
each), streamed (SSE), and timed at the client: time to the first content token, mean time
between tokens, end to end. summarize() turns the outcomes into one row of the report.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from bench.workloads import Schedule

REFUSED = (429, 503)


@dataclass(frozen=True)
class Outcome:
    """What one request got: "ok" (streamed to [DONE]), "refused" (429/503) or "error"."""

    result: str
    status: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: float | None = None  # mean time between tokens; 0 for a single token
    tokens: int = 0
    detail: str = ""


def content_of(event: bytes) -> str | None:
    """The text a `data:` line of a chat stream carries ("" when none); None at [DONE]."""
    payload = event[len(b"data:") :].strip()
    if payload == b"[DONE]":
        return None
    chunk = json.loads(payload)
    if "error" in chunk:
        raise ValueError(str(chunk["error"])[:200])
    choices = chunk.get("choices") or [{}]
    return str((choices[0].get("delta") or {}).get("content") or "")


async def send(
    session: aiohttp.ClientSession, url: str, body: dict[str, object], give_up_s: float
) -> Outcome:
    """One streamed request; a user who has seen no token after give_up_s leaves (an error)."""
    began = time.perf_counter()
    token_times: list[float] = []
    try:
        async with asyncio.timeout(give_up_s) as patience:
            async with session.post(url, json={**body, "stream": True}) as resp:
                if resp.status != 200:
                    await resp.read()
                    result = "refused" if resp.status in REFUSED else "error"
                    return Outcome(result, resp.status, detail=f"HTTP {resp.status}")
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    text = content_of(line)
                    if text is None:
                        return finished(began, token_times)
                    if text:
                        token_times.append(time.perf_counter())
                        patience.reschedule(None)  # streaming: only the session's total limit
                return Outcome("error", 200, detail="stream ended without [DONE]")
    except TimeoutError:
        waited = "no token" if not token_times else "no end"
        return Outcome("error", detail=f"{waited} after {time.perf_counter() - began:.0f} s")
    except (aiohttp.ClientError, ValueError) as exc:
        return Outcome("error", detail=f"{type(exc).__name__}: {exc}"[:200])


def finished(began: float, token_times: list[float]) -> Outcome:
    if not token_times:
        return Outcome("error", 200, detail="no token")
    first, last, n = token_times[0], token_times[-1], len(token_times)
    itl = (last - first) / (n - 1) if n > 1 else 0.0
    return Outcome("ok", 200, first - began, time.perf_counter() - began, itl, n)


async def run_open_loop(
    bases: Sequence[str], schedule: Schedule, model: str, give_up_s: float, timeout_s: float = 120
) -> list[Outcome]:
    """Send every request at its time to bases[request.instance]; wait for all to end."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        tasks: list[asyncio.Task[Outcome]] = []
        for request in schedule:
            delay = start + request.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            url = bases[request.instance] + "/v1/chat/completions"
            body = request.body(model)
            tasks.append(asyncio.create_task(send(session, url, body, give_up_s)))
        return list(await asyncio.gather(*tasks))


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 1.0
    itl_s: float = 0.050

    def met(self, o: Outcome) -> bool:
        ttft, itl = o.ttft_s or 0.0, o.itl_s or 0.0
        return o.result == "ok" and ttft <= self.ttft_s and itl <= self.itl_s


@dataclass(frozen=True)
class Summary:
    sent: int
    completed: int
    refused: int
    errors: int
    p50_ttft_s: float | None
    p99_ttft_s: float | None
    p99_e2e_s: float | None
    mean_itl_s: float | None
    goodput_rps: float
    throughput_rps: float
    first_error: str = ""


def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def summarize(outcomes: Sequence[Outcome], duration_s: float, slo: Slo) -> Summary:
    """Rates are per second of the schedule's window: what was finished of what was offered."""
    ok = [o for o in outcomes if o.result == "ok"]
    errors = [o for o in outcomes if o.result == "error"]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    return Summary(
        sent=len(outcomes),
        completed=len(ok),
        refused=sum(o.result == "refused" for o in outcomes),
        errors=len(errors),
        p50_ttft_s=pct(ttfts, 0.50),
        p99_ttft_s=pct(ttfts, 0.99),
        p99_e2e_s=pct([o.e2e_s for o in ok if o.e2e_s is not None], 0.99),
        mean_itl_s=statistics.mean(o.itl_s or 0.0 for o in ok) if ok else None,
        goodput_rps=sum(slo.met(o) for o in ok) / duration_s,
        throughput_rps=len(ok) / duration_s,
        first_error=errors[0].detail if errors else "",
    )
