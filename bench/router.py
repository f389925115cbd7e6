"""Benchmark: rps and latency through routers vs. direct, on one fixed-response fake backend.

Run: .venv/bin/python bench/router.py [--requests 2000] [--no-peers]
Targets: direct to the backend, Switchboard's router (with its registry and capacity services),
and sglang-router and vllm-router from PyPI (installed by this script into .bench/peers).
Every process runs on this machine; the numbers are ratios to direct, not absolute claims.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".bench" / "peers"
# The versions the numbers in docs/router.md were measured with (a run must be repeatable).
PEER_PINS = ("sglang-router==0.3.2", "vllm-router==0.1.17")
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(
    *argv: str, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    out = subprocess.DEVNULL if log is None else log.open("wb")
    return subprocess.Popen(
        argv, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
    )


async def wait_ok(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.post(url, json=BODY) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} never answered 200")


async def load(
    url: str, concurrency: int, total: int, stream: bool
) -> tuple[float, list[float], list[float]]:
    """rps, latencies (ms), time to first body byte (ms)."""
    latencies: list[float] = []
    ttfbs: list[float] = []
    left = [total]
    body = {**BODY, "stream": stream}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def loop() -> None:
            while left[0] > 0:
                left[0] -= 1
                began = time.perf_counter()
                async with s.post(url, json=body) as r:
                    first = await r.content.readany()
                    ttfbs.append((time.perf_counter() - began) * 1000)
                    while first:
                        first = await r.content.readany()
                    assert r.status == 200, r.status
                latencies.append((time.perf_counter() - began) * 1000)

        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return total / (time.perf_counter() - began), latencies, ttfbs


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def ensure_peers() -> bool:
    if not (PEERS / "bin" / "vllm-router").exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
        result = subprocess.run([str(PEERS / "bin" / "pip"), "install", "-q", *PEER_PINS])
        if result.returncode != 0:
            return False
    return (PEERS / "bin" / "vllm-router").exists() and (PEERS / "bin" / "python").exists()


async def start_switchboard(backend: str, procs: list[subprocess.Popen[bytes]], tmp: Path) -> str:
    from schemas.registry import SetStatusRequest, UpsertRequest, WorkerSpec, WorkerStatus
    from schemas.subjects import Subjects
    from services.cli.natsd import NatsServer
    from services.common.bus import Bus
    from services.registry.client import RegistryClient
    from services.registry.core import HEARTBEAT_LABEL

    nats = NatsServer(tmp / "js")
    url = nats.start()
    env = {"NATS_URL": url, "SUBJECT_PREFIX": "bench", "LOG_LEVEL": "warning"}
    port = free_port()
    procs.append(spawn(sys.executable, "-m", "services.registry", "--http-port", "0", env=env))
    procs.append(spawn(sys.executable, "-m", "services.capacity", "--http-port", "0", env=env))
    bus = await Bus.connect(url, "bench")
    client = RegistryClient(bus, Subjects.for_prefix("bench"), timeout_s=30)
    # The fake backend does not heartbeat: register it as a hand-managed external server.
    spec = WorkerSpec(
        url=backend, models=("m",), max_running_requests=4096, labels={HEARTBEAT_LABEL: "off"}
    )
    reply = await client.call(UpsertRequest(worker=spec))
    await client.call(SetStatusRequest(id=reply.worker.id, status=WorkerStatus.READY))  # type: ignore[union-attr]
    await bus.close()
    procs.append(spawn(sys.executable, "-m", "services.router", "--http-port", str(port), env=env))
    procs.append(nats)  # type: ignore[arg-type]
    return f"http://127.0.0.1:{port}"


async def main(total: int, peers: bool) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            backend_port = free_port()
            procs.append(
                spawn(sys.executable, str(ROOT / "bench" / "fake_backend.py"), str(backend_port))
            )
            backend = f"http://127.0.0.1:{backend_port}"
            targets = {
                "direct": backend,
                "switchboard": await start_switchboard(backend, procs, Path(tmp)),
            }
            if peers and ensure_peers():
                sg, vl = free_port(), free_port()
                procs.append(
                    spawn(
                        str(PEERS / "bin" / "python"),
                        "-m",
                        "sglang_router.launch_router",
                        "--worker-urls",
                        backend,
                        "--port",
                        str(sg),
                        "--policy",
                        "round_robin",
                        "--prometheus-port",  # both peers default to the same metrics port
                        str(free_port()),
                        log=PEERS.parent / "sglang-router.log",
                    )
                )
                procs.append(
                    spawn(
                        str(PEERS / "bin" / "vllm-router"),
                        "--worker-urls",
                        backend,
                        "--port",
                        str(vl),
                        "--policy",
                        "round_robin",
                        "--prometheus-port",
                        str(free_port()),
                        log=PEERS.parent / "vllm-router.log",
                    )
                )
                targets |= {
                    "sglang-router": f"http://127.0.0.1:{sg}",
                    "vllm-router": f"http://127.0.0.1:{vl}",
                }
            for name, base in list(targets.items()):
                try:
                    await wait_ok(base + "/v1/chat/completions")
                except RuntimeError as exc:
                    print(f"{name}: not usable ({exc}); left out")
                    log = PEERS.parent / f"{name}.log"
                    if log.exists():
                        tail = log.read_text(errors="replace").splitlines()[-5:]
                        print("  last lines of its log:", *tail, sep="\n    ")
                    del targets[name]
            print(
                f"{'target':<13} {'conc':>4} {'rps':>7} {'p50 ms':>7} {'p99 ms':>7} {'ttfb p50':>9}"
                f" {'rps/direct':>10} {'+ttfb ms':>8}"
            )
            for concurrency in (1, 16, 64):
                base_rps = base_ttfb = 0.0
                for name, base in targets.items():
                    n = total if concurrency > 1 else total // 4
                    await load(
                        base + "/v1/chat/completions", concurrency, min(n, 200), False
                    )  # warm-up
                    rps, lat, _ = await load(base + "/v1/chat/completions", concurrency, n, False)
                    _, _, ttfb = await load(
                        base + "/v1/chat/completions", concurrency, n // 2, True
                    )
                    ttfb50 = statistics.median(ttfb)
                    if name == "direct":
                        base_rps, base_ttfb = rps, ttfb50
                    print(
                        f"{name:<13} {concurrency:>4} {rps:>7.0f} {statistics.median(lat):>7.2f}"
                        f" {pct(lat, 0.99):>7.2f} {ttfb50:>9.2f} {rps / base_rps:>10.2f}"
                        f" {ttfb50 - base_ttfb:>8.2f}"
                    )
        finally:
            for proc in procs:
                if hasattr(proc, "terminate"):
                    proc.terminate()
                else:
                    proc.stop()  # type: ignore[attr-defined]
            for proc in procs:
                if hasattr(proc, "wait"):
                    proc.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.requests, not args.no_peers))
