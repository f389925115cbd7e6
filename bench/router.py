"""Benchmark: what a router costs on the data path, against fixed-response nginx backends.

Run: .venv/bin/python -m bench.router [--duration 5] [--quick] [--no-peers] [--baseline REF]
(or `make bench-router ARGS=...`). Load: wrk (a Lua script POSTs the body) at each concurrency;
backends: one unprivileged nginx (one worker) on two loopback ports, the two backends every router
is given, answering chat completions with a fixed JSON body and completions with a fixed SSE body
(8 events and [DONE]; nginx cannot see the body's "stream", so the kind goes by path).
Targets, one at a time: direct to nginx, vllm-router and sglang-router (PEER_PINS, installed into
.bench/peers), Switchboard with 1 and 2 routers on one port, and with --baseline REF Switchboard
run from `git archive REF`. Router CPU is utime+stime
from /proc/PID/stat of the router processes and their descendants (Switchboard: the router
processes only, not nats/registry/capacity). "Added first byte" is a Python client's time to the
first body byte of a streamed request, minus direct's. Every process shares this machine: read
ratios (to vllm-router), not absolutes. Without wrk or nginx (apt-get failed) it falls back to
the Python load generator or bench/fake_backend.py, and says so loudly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.router_backend import ensure_tools, start_fallback, start_nginx
from bench.router_load import (
    KINDS,
    cpu_during,
    lua_script,
    measure_ttfb,
    process_tree,
    run_python,
    run_wrk,
    sample_ticks,
)
from bench.router_stats import REFERENCE, Cell, Ttfb, WrkResult, pct, ratios, table, ttfb_table
from bench.router_targets import (
    Target,
    export_tree,
    free_port,
    log_tails,
    start_peer,
    start_switchboard,
)

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".bench" / "peers"
# The versions the numbers in docs/router.md were measured with (a run must be repeatable).
PEER_PINS = ("sglang-router==0.3.2", "vllm-router==0.1.17")
RESULTS = ROOT / ".bench" / "router-results.json"
__all__ = ["PEERS", "PEER_PINS", "ensure_peers", "free_port", "pct", "spawn"]

Load = Callable[[str, str, int, int], WrkResult]  # (url, kind, concurrency, seconds)
Step = tuple[str, Callable[[], Target]]


def spawn(
    *argv: str, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    out = subprocess.DEVNULL if log is None else log.open("wb")
    return subprocess.Popen(
        argv, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
    )


def ensure_peers() -> bool:
    if not (PEERS / "bin" / "vllm-router").exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
        result = subprocess.run([str(PEERS / "bin" / "pip"), "install", "-q", *PEER_PINS])
        if result.returncode != 0:
            return False
    return (PEERS / "bin" / "vllm-router").exists() and (PEERS / "bin" / "python").exists()


def warn(message: str) -> None:
    bar = "!" * 78
    print(f"{bar}\n!! WARNING: {message}\n{bar}", flush=True)


def loader(wrk: str | None, tmp: Path, threads: int) -> Load:
    if wrk is None:
        warn("no wrk: the Python load generator saturates first (~7.5k rps direct)")
        return lambda url, kind, c, s: run_python(url, KINDS[kind][1], c, s)
    scripts = {}
    for kind, (_, body) in KINDS.items():
        scripts[kind] = tmp / f"{kind}.lua"
        scripts[kind].write_text(lua_script(body))
    return lambda url, kind, c, s: run_wrk(wrk, url, scripts[kind], c, s, threads)


def measure(target: Target, load: Load, args: argparse.Namespace) -> list[Cell]:
    """Each kind at each concurrency: a warm-up, then the load with the routers' CPU around it."""
    cells = []
    for kind, (path, _) in KINDS.items():
        for c in args.concurrency:
            url = target.base + path
            try:
                if args.warmup:
                    load(url, kind, c, args.warmup)
                pids = process_tree(target.router_pids)
                before = sample_ticks(pids)
                result = load(url, kind, c, args.duration)
                cpu = cpu_during(pids, before) if pids else None
                cells.append(Cell(target.name, kind, c, result, cpu))
            except Exception as exc:  # one bad cell (wrk failed) does not end the run
                cells.append(Cell(target.name, kind, c, None, note=f"failed: {exc}"[:200]))
            print(f"  {kind} c={c}: {brief(cells[-1])}", flush=True)
    return cells


def brief(cell: Cell) -> str:
    r = cell.result
    if r is None:
        return cell.note
    cpu = "" if cell.cpu_per_1k is None else f", {cell.cpu_per_1k:.3f} CPU s/1k"
    return f"{r.rps:.0f} rps, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, {r.errors} errors{cpu}"


def plan(args: argparse.Namespace, backends: list[str], tmp: Path) -> list[Step]:
    """Each target's name and how to start it, in the order they run and are listed."""
    steps: list[Step] = [("direct", partial(Target, "direct", backends[0]))]
    if args.peers and ensure_peers():
        for peer in ("vllm-router", "sglang-router"):
            steps.append((peer, partial(start_peer, peer, PEERS, backends)))
    elif args.peers:
        print(f"peers: could not install {PEER_PINS} into {PEERS}; left out")
    for n in args.routers:
        name = "Switchboard" + (f" --routers {n}" if n > 1 else "")
        steps.append((name, partial(start_switchboard, name, backends, n, ROOT, tmp)))
    if args.baseline:
        name = f"Switchboard @{args.baseline}"

        def baseline() -> Target:
            tree = export_tree(args.baseline, tmp / "baseline")
            return start_switchboard(name, backends, 1, tree, tmp)

        steps.append((name, baseline))
    return steps


def measure_ttfbs(target: Target, args: argparse.Namespace) -> list[Ttfb]:
    rows = []
    for c in args.ttfb_concurrency:
        budget_s = 2 * args.duration + 5  # a slow router (sglang's ~40 ms) ends by time
        p50, p99, n, failed = measure_ttfb(target.base, c, args.ttfb_requests, budget_s)
        rows.append(Ttfb(target.name, c, p50, p99, n, failed))
        print(f"  TTFB c={c}: p50 {p50:.2f} ms, p99 {p99:.2f} ms ({n} requests)", flush=True)
    return rows


def run_targets(
    args: argparse.Namespace, load: Load, backends: list[str], tmp: Path
) -> tuple[list[Cell], list[Ttfb]]:
    """Each target in turn: started, measured, stopped; one that does not start is left out."""
    cells: list[Cell] = []
    ttfbs: list[Ttfb] = []
    for name, start in plan(args, backends, tmp):
        print(f"{name}: starting", flush=True)
        try:
            target = start()
        except Exception as exc:
            print(f"{name}: not usable ({exc}); left out", *log_tails(name), sep="\n    ")
            continue
        try:
            cells += measure(target, load, args)
            ttfbs += measure_ttfbs(target, args)
        finally:
            target.stop()
    order = list(dict.fromkeys(c.target for c in cells))  # the targets in the order they ran
    cells.sort(key=lambda c: (list(KINDS).index(c.kind), c.concurrency, order.index(c.target)))
    return cells, ttfbs


def run(args: argparse.Namespace) -> dict[str, object]:
    began = time.monotonic()
    tools: dict[str, str | None] = {"wrk": None, "nginx": None}
    if not args.fallback:
        tools = ensure_tools()
    ports = [free_port(), free_port()]
    backends = [f"http://127.0.0.1:{p}" for p in ports]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        load = loader(tools["wrk"], tmp, args.wrk_threads)
        prefix: Path | None = None
        if tools["nginx"]:
            nginx, prefix = start_nginx(tools["nginx"], ports)
            backend = [nginx]
        else:
            warn("no nginx: the backends are bench/fake_backend.py (Python, far slower)")
            backend = start_fallback(ports, tmp)
        try:
            cells, ttfbs = run_targets(args, load, backends, tmp)
        finally:
            for proc in backend:
                proc.terminate()
                proc.wait(10)
            if prefix is not None:
                shutil.rmtree(prefix, ignore_errors=True)
    return report(args, tools, cells, ttfbs, time.monotonic() - began)


def report(
    args: argparse.Namespace,
    tools: dict[str, str | None],
    cells: list[Cell],
    ttfbs: list[Ttfb],
    took_s: float,
) -> dict[str, object]:
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    load = "wrk" if tools["wrk"] else "python (FALLBACK)"
    backend = "nginx" if tools["nginx"] else "bench/fake_backend.py (FALLBACK)"
    if not (tools["wrk"] and tools["nginx"]):
        warn(f"FALLBACK: load {load}, backend {backend}: the numbers below are not wrk's")
    print(
        f"\n## Router data path: load {load}, backend {backend}, {args.duration} s per cell"
        f" after {args.warmup} s warm-up; peers {', '.join(PEER_PINS)};"
        f" tree {head.stdout.strip()}{' + uncommitted changes' if dirty.stdout.strip() else ''}\n"
    )
    print(table(cells))
    print("\nAdded first byte (streamed requests; a Python client, so read the difference):\n")
    print(ttfb_table(ttfbs))
    print(f"\nwhole run: {took_s:.0f} s")
    results: dict[str, object] = {
        "command": sys.argv,
        "load": load,
        "backend": backend,
        "peers": list(PEER_PINS),
        "head": head.stdout.strip(),
        "dirty": bool(dirty.stdout.strip()),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "took_s": round(took_s, 1),
        "cells": [
            {**dataclasses.asdict(c), "cpu_per_1k": c.cpu_per_1k, "to_reference": to_ref(c, cells)}
            for c in cells
        ],
        "ttfb": [dataclasses.asdict(t) for t in ttfbs],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"results: {RESULTS}")
    return results


def to_ref(cell: Cell, cells: list[Cell]) -> dict[str, object]:
    rps, cpu = ratios(cell, cells)
    return {"reference": REFERENCE, "rps": rps, "cpu": cpu}


def counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds of load per cell")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each cell")
    parser.add_argument("--concurrency", type=counts, default=[16, 64])
    parser.add_argument("--ttfb-concurrency", type=counts, default=[1, 16])
    parser.add_argument("--ttfb-requests", type=int, default=1000)
    parser.add_argument("--routers", type=counts, default=[1, 2], help="Switchboard rows")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument(
        "--baseline", metavar="REF", help="also run Switchboard from git archive REF"
    )
    parser.add_argument(
        "--fallback", action="store_true", help="the Python load and backends even with wrk/nginx"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 s cells")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.ttfb_requests = 1, 1, 100
    run(args)


if __name__ == "__main__":
    main()
