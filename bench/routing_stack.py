"""The routing benchmark's processes: the sim fleet, Switchboard's routers, the peers' routers.

Each is a separate process started by its command line (`python -m services.<name>`, the peers'
launchers) and watched over HTTP only, so the benchmark does not depend on the services' insides.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.router import PEERS, free_port
from bench.workloads import SimWorker

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / ".bench" / "routing-logs"
MODEL = "sim-model"
PREFIX = "routing"
PEER_KINDS = ("sglang", "vllm")
HIT, QUERY = "prefix_cache_hits_total", "prefix_cache_queries_total"  # as vLLM names them
TOKENS = "switchboard_worker_tokens_generated_total"
WARMUP = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class Procs:
    """Child processes of this run, each logging to LOGS/<name>.log; stopped in reverse order."""

    def __init__(self, env: dict[str, str], source: Path = ROOT) -> None:
        # The services run from `source` (python -m puts the working directory first on the path).
        self.env, self.source = env, source
        self.running: list[subprocess.Popen[bytes]] = []
        self.names: dict[int, str] = {}

    def start(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        with (LOGS / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                argv, env=self.env, cwd=self.source, stdout=log, stderr=subprocess.STDOUT
            )
        self.running.append(proc)
        self.names[proc.pid] = name
        return proc

    def check_alive(self, since: int = 0) -> None:
        """Raise if a process started since the `since`-th has exited: say how, and its last
        log line (waiting on for a process that is gone would only time out)."""
        for proc in self.running[since:]:
            if proc.poll() is not None:
                name = self.names[proc.pid]
                lines = (LOGS / f"{name}.log").read_text(errors="replace").strip().splitlines()
                last = lines[-1][-200:] if lines else ""
                raise RuntimeError(f"{name} exited with {proc.returncode}: {last}")

    def stop(self, procs: list[subprocess.Popen[bytes]] | None = None) -> None:
        chosen = list(reversed(self.running if procs is None else procs))
        for proc in chosen:
            proc.terminate()
        for proc in chosen:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            self.running.remove(proc)


def service(name: str, *flags: str) -> tuple[str, ...]:
    return (sys.executable, "-m", f"services.{name}", *flags)


async def until(
    check: Callable[[], Awaitable[bool]],
    what: str,
    timeout_s: float = 60,
    alive: Callable[[], None] = lambda: None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive()
        try:
            if await check():
                return
        except (aiohttp.ClientError, OSError, ValueError):
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


async def get_json(url: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        body: dict[str, object] = await r.json(content_type=None)
        return body


async def start_fleet(
    procs: Procs, fleet: Sequence[SimWorker], worker_args: list[str]
) -> dict[str, str]:
    """nats-server, registry, capacity and the fleet's workers; their base URLs by name."""
    nats = Path(sys.executable).parent / "nats-server"
    binary = str(nats) if nats.exists() else shutil.which("nats-server") or "nats-server"
    port = free_port()
    store = LOGS / f"js-{port}"  # a fresh JetStream store: no records of an earlier fleet
    procs.start("nats", binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store))

    async def listening() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    await until(listening, "nats-server")
    procs.env |= {"NATS_URL": f"nats://127.0.0.1:{port}", "SUBJECT_PREFIX": PREFIX}
    procs.start("registry", *service("registry", "--http-port", str(free_port())))
    procs.start("capacity", *service("capacity", "--http-port", str(free_port())))
    workers = {}
    for worker in fleet:
        wport = free_port()
        flags = ("--http-port", str(wport), *worker.flags(), *worker_args)
        procs.start(worker.name, *service("worker", *flags))
        workers[worker.name] = f"http://127.0.0.1:{wport}"
    for name, base in workers.items():

        async def ready(base: str = base) -> bool:
            return (await get_json(base + "/health")).get("status") == "ready"

        await until(ready, f"worker {name}", alive=procs.check_alive)
    return workers


async def wait_idle(workers: dict[str, str]) -> None:
    """Every worker has nothing running or queued, and has said so in a heartbeat (1 s): the
    last target's stragglers and the warm-up are not the next load's."""

    async def idle() -> bool:
        for base in workers.values():
            models = (await get_json(base + "/health")).get("models")
            if not isinstance(models, list):
                return False
            if any(m.get("in_flight") or m.get("queue_depth") for m in models):
                return False
        return True

    await until(idle, "the workers to go idle", timeout_s=120)
    await asyncio.sleep(1.2)


async def counters(workers: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per worker: its generated tokens and prefix-cache counters (where it has them)."""
    out: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession() as s:
        for name, base in workers.items():
            async with s.get(base + "/metrics") as r:
                text = await r.text()
            sums: dict[str, float] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    for key in (TOKENS, HIT, QUERY):
                        if sample.name.endswith(key):
                            sums[key] = sums.get(key, 0.0) + sample.value
            out[name] = sums
    return out


def deltas(
    before: dict[str, dict[str, float]],
    after: dict[str, dict[str, float]],
    fast_workers: Sequence[str],
) -> tuple[float | None, float | None]:
    """The fast workers' share of the tokens, and the prefix-cache hit rate (None: unreported)."""

    def moved(name: str, key: str) -> float:
        return after[name].get(key, 0.0) - before[name].get(key, 0.0)

    tokens = {name: moved(name, TOKENS) for name in after}
    total = sum(tokens.values())
    fast = sum(v for name, v in tokens.items() if name in fast_workers)
    queries = sum(moved(name, QUERY) for name in after)
    hits = sum(moved(name, HIT) for name in after)
    reported = any(QUERY in c for c in after.values())
    return (fast / total if total else None), (hits / queries if reported and queries else None)


async def start_switchboard(procs: Procs, n: int, workers: int, policy: str = "") -> list[str]:
    """n routers, each with 1/n of the capacity (as `up --routers n`), that know every worker;
    with the router's --policy when one is named (else its default)."""
    started = len(procs.running)
    bases = []
    for i in range(n):
        port = free_port()
        chosen = ("--policy", policy) if policy else ()
        flags = ("--http-port", str(port), "--capacity-share", f"{1 / n:.6f}", *chosen)
        procs.start(f"router-{i + 1}", *service("router", *flags))
        bases.append(f"http://127.0.0.1:{port}")
    for base in bases:

        async def knows_fleet(base: str = base) -> bool:
            health = await get_json(base + "/health")
            known = await get_json(base + "/healthz")
            return health.get("workers") == workers and bool(known.get("capacity_known"))

        what = "the router to know every worker and the capacity"
        await until(knows_fleet, what, alive=lambda: procs.check_alive(started))
    await asyncio.sleep(2.0)  # two heartbeats: every worker's load is known before the load
    return bases


def start_peer(procs: Procs, kind: str, policy: str, workers: list[str], i: int) -> str:
    """The i-th instance of a peer router with one policy over the workers' URLs."""
    port, metrics = free_port(), free_port()  # both peers default to the same metrics port
    common = ("--worker-urls", *workers, "--port", str(port), "--policy", policy)
    common += ("--prometheus-port", str(metrics))
    if kind == "sglang":
        argv = (str(PEERS / "bin" / "python"), "-m", "sglang_router.launch_router", *common)
        procs.start(f"sglang-{policy}-{i + 1}", *argv, "--log-level", "warn")
    else:
        argv = (str(PEERS / "bin" / "vllm-router"), *common, "--log-level", "warning")
        procs.start(f"vllm-{policy}-{i + 1}", *argv)
    return f"http://127.0.0.1:{port}"


async def warm(bases: list[str], alive: Callable[[], None]) -> None:
    """Each instance answers a request (peers: their start; all: connections opened)."""
    async with aiohttp.ClientSession() as s:
        for base in bases:

            async def answers(base: str = base) -> bool:
                async with s.post(base + "/v1/chat/completions", json=WARMUP) as r:
                    await r.read()
                    return r.status == 200

            await until(answers, f"{base} to answer", alive=alive)
