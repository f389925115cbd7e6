"""The router benchmark's pure parts: wrk's text output, CPU time from /proc/PID/stat, the ratio
table and its markdown (no I/O: the shell in bench/router.py reads files and runs processes)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# wrk's own units (its stats.c/units.c): times in us/ms/s/m/h, counts with k/M/G suffixes.
TIME_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
COUNT = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}
REFERENCE = "vllm-router"  # the ratio columns divide by this target's row of the same cell


class WrkParseError(ValueError):
    """wrk's output lacks a line the benchmark needs (wrk failed, or printed another format)."""


def time_ms(text: str) -> float:
    """'850.00us' -> 0.85, '1.23ms' -> 1.23, '2.1s' -> 2100.0 (milliseconds)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)(us|ms|s|m|h)\s*", text)
    if match is None:
        raise WrkParseError(f"not a wrk time: {text!r}")
    return float(match[1]) * TIME_MS[match[2]]


def count(text: str) -> float:
    """'12.34k' -> 12340.0, '1.5M' -> 1500000.0, '812' -> 812.0."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)([kMG]?)\s*", text)
    if match is None:
        raise WrkParseError(f"not a wrk count: {text!r}")
    return float(match[1]) * COUNT[match[2]]


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: completed requests, how long, latency percentiles, and failures."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int = 0
    socket_errors: int = 0
    thread_rps: float | None = None  # the mean of wrk's per-thread Req/Sec ("12.34k")

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def parse_wrk(text: str) -> WrkResult:
    """wrk --latency's report (the 'Latency Distribution' block needs --latency)."""
    done = re.search(r"^\s*(\d+) requests in ([0-9.]+\w+),", text, re.M)
    rps = re.search(r"^Requests/sec:\s*([0-9.]+)", text, re.M)
    pcts = dict(re.findall(r"^\s*(50|99)%\s+([0-9.]+\w+)\s*$", text, re.M))
    if done is None or rps is None or set(pcts) != {"50", "99"}:
        first = text.strip().splitlines()[:1]
        raise WrkParseError(f"wrk printed no results (first line: {first})")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    sockets = re.search(r"Socket errors:([^\n]*)", text)
    thread = re.search(r"^\s*Req/Sec\s+(\S+)", text, re.M)
    return WrkResult(
        requests=int(done[1]),
        duration_s=time_ms(done[2]) / 1000,
        rps=float(rps[1]),
        p50_ms=time_ms(pcts["50"]),
        p99_ms=time_ms(pcts["99"]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in re.findall(r"\d+", sockets[1])) if sockets else 0,
        thread_rps=count(thread[1]) if thread else None,
    )


def stat_ticks(stat: str) -> int:
    """utime + stime (clock ticks, every thread of the process) from a /proc/PID/stat line."""
    # The command name (field 2) is in parentheses and may hold spaces or ')': cut after the last.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted from 3


def stat_ppid(stat: str) -> int:
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def descendants(roots: Sequence[int], parents: dict[int, int]) -> list[int]:
    """The roots and every process below them, given each live pid's parent."""
    found = list(roots)
    for pid in found:  # grows while walking: breadth first
        found += [child for child, parent in parents.items() if parent == pid]
    return found


def cpu_seconds(before: dict[int, int], after: dict[int, int], hz: int) -> float:
    """CPU seconds the processes spent between two samples of their ticks (pid -> ticks); a
    process gone by the second sample counts what it had at the first (nothing more is known)."""
    return sum(after.get(pid, ticks) - ticks for pid, ticks in before.items()) / hz


def per_1k(cpu_s: float, requests: int) -> float | None:
    return cpu_s * 1000 / requests if requests else None


@dataclass(frozen=True)
class Cell:
    """One target under one load: body kind (json/sse), concurrency, wrk's result, its CPU."""

    target: str
    kind: str
    concurrency: int
    result: WrkResult | None
    cpu_s: float | None = None  # None: not measured (direct: no router process)
    note: str = ""

    @property
    def cpu_per_1k(self) -> float | None:
        if self.result is None or self.cpu_s is None:
            return None
        return per_1k(self.cpu_s, self.result.requests)


def ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def ratios(cell: Cell, cells: Sequence[Cell]) -> tuple[float | None, float | None]:
    """(rps ÷ the reference's rps, CPU per request ÷ the reference's) for the same kind and
    concurrency; None where either side is missing."""
    ref = next(
        (
            c
            for c in cells
            if c.target == REFERENCE and (c.kind, c.concurrency) == (cell.kind, cell.concurrency)
        ),
        None,
    )
    if ref is None or ref.result is None or cell.result is None:
        return None, None
    return ratio(cell.result.rps, ref.result.rps), ratio(cell.cpu_per_1k, ref.cpu_per_1k)


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def table(cells: Sequence[Cell]) -> str:
    """The throughput table: one row per cell, in the order given."""
    lines = [
        "| target | body | conc | rps | p50 ms | p99 ms | errors | router CPU s / 1k req"
        f" | rps ÷ {REFERENCE} | CPU ÷ {REFERENCE} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        r = cell.result
        rps_x, cpu_x = ratios(cell, cells)
        if r is None:
            lines.append(f"| {cell.target} | {cell.kind} | {cell.concurrency} | {cell.note} |")
            continue
        lines.append(
            f"| {cell.target} | {cell.kind} | {cell.concurrency} | {r.rps:.0f} | {r.p50_ms:.2f}"
            f" | {r.p99_ms:.2f} | {r.errors} | {fmt(cell.cpu_per_1k, 3)}"
            f" | {fmt(rps_x, 2, 'x')} | {fmt(cpu_x, 2, 'x')} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Ttfb:
    """Time to the first body byte of streamed requests through one target at one concurrency."""

    target: str
    concurrency: int
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int = 0


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def ttfb_table(rows: Sequence[Ttfb], direct: str = "direct") -> str:
    """TTFB per target and concurrency, and what it adds to direct's at the same concurrency."""
    base = {r.concurrency: r for r in rows if r.target == direct}
    lines = [
        "| target | conc | TTFB p50 ms | TTFB p99 ms | added p50 ms | added p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = base.get(r.concurrency)
        add50 = None if b is None else r.p50_ms - b.p50_ms
        add99 = None if b is None else r.p99_ms - b.p99_ms
        lines.append(
            f"| {r.target} | {r.concurrency} | {r.p50_ms:.2f} | {r.p99_ms:.2f}"
            f" | {fmt(add50)} | {fmt(add99)} | {r.errors} |"
        )
    return "\n".join(lines)
