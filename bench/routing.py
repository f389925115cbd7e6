"""Routing benchmark: one heterogeneous sim fleet behind Switchboard's router and peer routers.

Run: .venv/bin/python -m bench.routing (or bench/routing.py, or `make bench-routing ARGS=...`)
  --workloads a,b,c  --targets switchboard,switchboard:least_busy,sglang:cache_aware,vllm:...
  --duration-s 10    --seed 1   --load 0.7   --speed 1   --no-peers   --png .bench/routing.png
  --slo-ttft-s 1 --slo-itl-ms 50   --give-up-s 10   --worker-args '--sim-prefix-cache-blocks 64'
  --source DIR       (the services of another tree: `git archive BASE | tar -x -C DIR`)
The defaults take about 10 minutes on 2 cores; the issue's longer runs: --duration-s 60.

What runs: nats-server, registry, capacity and four sim workers (bench/workloads.py FLEET: two
fast with 16 slots, two at a third of the speed with 4; --speed scales them all), the workers
registering over NATS as under `up`, started afresh for every target and workload (cold prefix
caches for each: the workloads repeat their prompts). Then each target in turn: Switchboard's
router (finding the workers over NATS; `switchboard` runs its default policy,
`switchboard:NAME` its --policy NAME) and sglang-router /
vllm-router (installed from PyPI into .bench/peers as bench/router.py does) given the four worker
URLs and one policy each. Workload (c) goes through two instances of each
target (Switchboard: two routers with half the capacity each, as `up --routers 2` runs them).
Every service is a separate process driven by its command line and HTTP only. A peer that cannot
be installed or started gets a "not run" row, and the others run.

Load: open loop at --load of the fleet capacity computed from the sim settings (printed first):
each request is sent at its scheduled time whatever came back before, streamed, and timed at
the client. A request with no token after --give-up-s is abandoned (an error).

Columns: completed (streamed to [DONE]); refused (429/503); errors (anything else, abandoned
ones included); TTFT percentiles and p99 end to end over completed requests (the PNG's curves are
over all sent requests, so refusals and errors show as a curve that never reaches 1); mean ITL:
the mean over completed requests of each one's mean time between tokens; goodput: completed
requests with TTFT <= --slo-ttft-s and mean ITL <= --slo-itl-ms, per second of the arrival
window; completed r/s likewise; ÷ best peer: against the best peer policy in the same table on
that column (goodput: higher is better; p99 TTFT: lower is better); fast share: the fast
workers' share of generated tokens; prefix hit: prefix_cache_hits_total / _queries_total from
the workers' /metrics, "n/a" where they do not count them. Logs of the last run: .bench/
routing-logs/. Everything shares this machine's CPU (the load average is printed at the start
and the end): read the numbers as ratios between targets of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: bench/ is not yet importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import Slo, run_open_loop, summarize
from bench.router import ensure_peers
from bench.routing_report import Row, table, write_png
from bench.routing_stack import (
    LOGS,
    MODEL,
    PEER_KINDS,
    ROOT,
    Procs,
    counters,
    deltas,
    start_fleet,
    start_peer,
    start_switchboard,
    wait_idle,
    warm,
)
from bench.workloads import (
    FLEET,
    OUTPUT_MIX,
    WORKLOADS,
    SimWorker,
    Workload,
    fleet_capacity_rps,
    mean_of,
    scaled,
)

DEFAULT_TARGETS = (
    "switchboard,switchboard:least_busy,sglang:round_robin,sglang:power_of_two,sglang:cache_aware,"
    "vllm:round_robin,vllm:power_of_two,vllm:cache_aware"
)
# What a peer policy cannot do with these workers, said under each table it appears in.
KNOWN = {
    "sglang:power_of_two": "sglang:power_of_two reads each worker's load from SGLang's own"
    " /get_load, which the sim workers lack (its log: 'No loads fetched from workers'), so it"
    " picks between two workers blindly here.",
}


async def run_target(
    target: str,
    workload: Workload,
    args: argparse.Namespace,
    procs: Procs,
    workers: dict[str, str],
    fleet: Sequence[SimWorker],
) -> Row:
    """Start the target's instances, run the workload through them, stop them."""
    kind, _, policy = target.partition(":")
    started = len(procs.running)
    phases = [time.monotonic()]
    try:
        if kind == "switchboard":
            bases = await start_switchboard(procs, workload.instances, len(workers), policy)
        elif kind in PEER_KINDS:
            urls = list(workers.values())
            bases = [start_peer(procs, kind, policy, urls, i) for i in range(workload.instances)]
        else:
            raise RuntimeError(
                f"unknown target kind {kind!r}: switchboard, {', '.join(PEER_KINDS)}"
            )
        await warm(bases, lambda: procs.check_alive(started))
        await wait_idle(workers)
        schedule = workload.make(args.seed, args.duration_s, args.rate)
        before = await counters(workers)
        phases.append(time.monotonic())
        outcomes = await run_open_loop(bases, schedule, MODEL, args.give_up_s)
        phases.append(time.monotonic())
        fastest = max(w.tokens_per_s for w in fleet)
        fast = [w.name for w in fleet if w.tokens_per_s == fastest]
        fast_share, hit_rate = deltas(before, await counters(workers), fast)
    except RuntimeError as exc:
        return Row(target, None, f"not run: {exc} (logs: {LOGS.relative_to(ROOT)})")
    finally:
        procs.stop(procs.running[started:])
    phases.append(time.monotonic())
    summary = summarize(outcomes, args.duration_s, Slo(args.slo_ttft_s, args.slo_itl_ms / 1000))
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    took = "start {:.0f} s, load {:.0f} s, stop {:.0f} s".format(
        *(b - a for a, b in itertools.pairwise(phases))
    )
    return Row(target, summary, took, fast_share, hit_rate, ttfts, len(outcomes))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration-s", type=float, default=10.0, help="arrival window per run (bursts every 5 s)"
    )
    parser.add_argument("--workloads", default="a,b,c")
    parser.add_argument("--targets", default=DEFAULT_TARGETS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--load", type=float, default=0.7, help="share of the fleet's capacity")
    parser.add_argument(
        "--speed", type=float, default=1.0, help="multiplies every worker's tokens/s (x4: 300/100)"
    )
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument(
        "--worker-args", default="", help="more flags for every worker (its --help lists them)"
    )
    parser.add_argument("--png", type=Path, default=ROOT / ".bench" / "routing.png")
    parser.add_argument(
        "--source",
        type=Path,
        default=ROOT,
        help="run the services from this tree (e.g. a `git archive` of a baseline commit)",
    )
    parser.add_argument("--slo-ttft-s", type=float, default=1.0)
    parser.add_argument("--slo-itl-ms", type=float, default=50.0)
    parser.add_argument(
        "--give-up-s", type=float, default=10.0, help="a request with no token by then: an error"
    )
    args = parser.parse_args(argv)
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}: choose from {', '.join(WORKLOADS)}")
    return args


def describe(fleet: Sequence[SimWorker], args: argparse.Namespace, capacity: float) -> None:
    for w in fleet:
        print(f"{w.name}: {w.tokens_per_s:g} tok/s, batch {w.batch}: "
              f"{w.capacity_rps(mean_of(OUTPUT_MIX)):.1f} req/s")  # fmt: skip
    print(
        f"fleet capacity {capacity:.1f} req/s (mean output {mean_of(OUTPUT_MIX):.1f} tokens);"
        f" offered {args.rate:.1f} req/s ({args.load:.0%}), {args.duration_s:g} s per run,"
        f" seed {args.seed}; SLO: TTFT <= {args.slo_ttft_s:g} s, ITL <= {args.slo_itl_ms:g} ms;"
        f" load average {os.getloadavg()[0]:.2f}\n"
    )


async def on_a_fresh_fleet(
    target: str, workload: Workload, args: argparse.Namespace, fleet: Sequence[SimWorker]
) -> Row:
    """One target on a stack started for it alone: every target meets cold prefix caches (the
    workloads repeat their prompts, so a fleet kept between targets would favour later ones)."""
    procs = Procs({**os.environ, "LOG_LEVEL": "warning"}, args.source.resolve())
    try:
        workers = await start_fleet(procs, fleet, shlex.split(args.worker_args))
        return await run_target(target, workload, args, procs, workers, fleet)
    except RuntimeError as exc:
        return Row(target, None, f"not run: the fleet did not start: {exc}")
    finally:
        procs.stop()


async def main(args: argparse.Namespace) -> None:
    fleet = scaled(FLEET, args.speed)
    capacity = fleet_capacity_rps(fleet)
    args.rate = args.load * capacity
    targets = [t for t in args.targets.split(",") if t]
    workloads = [WORKLOADS[w] for w in args.workloads.split(",") if w]
    skipped: dict[str, str] = {}
    peers = [t for t in targets if t.partition(":")[0] in PEER_KINDS]
    if args.no_peers:
        targets = [t for t in targets if t not in peers]
    elif peers and not ensure_peers():
        skipped = dict.fromkeys(peers, "not run: the peers could not be installed")
    describe(fleet, args, capacity)
    shutil.rmtree(LOGS, ignore_errors=True)
    LOGS.mkdir(parents=True)
    results: dict[str, list[Row]] = {}
    began = time.monotonic()
    for workload in workloads:
        rows = results.setdefault(workload.name, [])
        for target in targets:
            if target in skipped:
                rows.append(Row(target, None, skipped[target]))
                continue
            rows.append(await on_a_fresh_fleet(target, workload, args, fleet))
            print(f"  ({workload.name}) {target}: {rows[-1].brief()}", flush=True)
        print()
        print(table(workload, rows, PEER_KINDS))
        notes = [KNOWN[t] for t in targets if t in KNOWN]
        print("".join(f"- {note}\n" for note in notes), flush=True)
    write_png(args.png, results, workloads, args.slo_ttft_s)
    took = time.monotonic() - began
    print(f"TTFT distributions: {args.png}; logs: {LOGS}; took {took:.0f} s;", end=" ")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
