"""Benchmark: how fast a worker's status change reaches the router's view at fleet scale, and
what the live dashboard feed costs per viewer.

Run: .venv/bin/python -m bench.control [--workers 1000] [--changes 200]

Starts a nats-server, a registry (its own process), a heartbeat publisher (its own process: N
simulated workers publishing WorkerLoad at 1 Hz on their own subjects, as the principal that owns
their records) and a router in this process. Each change is one SetStatus command (Ready <->
Draining) through the registry's command API; it is seen when the router's `changes.notify()`
runs with the router's view holding the new status (the shell calls it right after it applied
the event: the first moment a request could be routed with it). Reported: send -> view and
reply -> view (the registry publishes the event before it replies, so the latter can be < 0).
Scenarios: one worker ("empty fleet"); N idle workers; N heartbeating at 1 Hz spread over the
second (workers started at different times), the same with one dashboard viewer connected, and
all in step (a fleet started together); cpu is this process's (router and bench client) share
of one core with nothing but heartbeats going on. The viewer's feed is measured in bytes per
second with a steady load and with a new load in every heartbeat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from schemas import codec
from schemas.load import ModelLoad, WorkerLoad
from schemas.registry import (
    CommandOk,
    RegisterRequest,
    SetStatusRequest,
    WorkerSpec,
    WorkerStatus,
    WorkerStatusChanged,
)
from schemas.subjects import Subjects
from services.cli.natsd import NatsServer
from services.common.bus import Bus, Message
from services.common.run import start_in_process
from services.common.seq import Sequencer
from services.registry.client import RegistryClient
from services.registry.index import HEARTBEAT_LABEL
from services.router.config import RouterConfig
from services.router.main import serve as serve_router

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "control"
PRINCIPAL = "bench-worker"  # the NATS user the simulated workers publish as (no auth here)
MODELS = 20  # worker i serves model-(i % MODELS)
S = WorkerStatus


def worker_url(i: int) -> str:
    return f"http://10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8000"


class Seen:
    """Timestamps the first changes.notify() after which the router's view shows a status, and
    the registry's stamp on the event that carried it."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.want: tuple[str, WorkerStatus] | None = None  # until the view shows it
        self.announced: tuple[str, WorkerStatus] | None = None  # until the event is heard
        self.seen: asyncio.Future[tuple[float, float]] | None = None
        self.stamped: asyncio.Future[float] | None = None
        original: Callable[[], None] = shell.changes.notify

        def notify() -> None:
            original()
            if self.want is None or self.seen is None:
                return
            record = shell.view.records.get(self.want[0])
            if record is not None and record.status == self.want[1]:
                self.seen.set_result((time.perf_counter(), time.time()))
                self.want = None

        shell.changes.notify = notify

    async def on_event(self, msg: Message) -> None:
        env = codec.registry_event_decoder.decode(msg.data)
        body, stamped = env.body, self.stamped
        if stamped is None or stamped.done() or not isinstance(body, WorkerStatusChanged):
            return
        if (body.worker_id, body.new_status) == self.announced:
            stamped.set_result(env.sent_at)

    def expect(self, worker_id: str, status: WorkerStatus) -> None:
        self.want = self.announced = (worker_id, status)
        self.seen = asyncio.get_running_loop().create_future()
        self.stamped = asyncio.get_running_loop().create_future()


class Latencies:
    """Per change, in ms: command sent -> view, reply -> view, registry's stamp -> view."""

    def __init__(self) -> None:
        self.send: list[float] = []
        self.reply: list[float] = []
        self.event: list[float] = []


async def change_statuses(
    client: RegistryClient, seen: Seen, ids: list[str], changes: int
) -> Latencies:
    """Flip workers Ready <-> Draining one at a time."""
    out = Latencies()
    rng = random.Random(7)
    for k in range(changes):
        worker_id = ids[(k * 7919) % len(ids)]
        now = seen.shell.view.records[worker_id].status
        wanted = S.DRAINING if now == S.READY else S.READY
        seen.expect(worker_id, wanted)
        assert seen.seen is not None
        assert seen.stamped is not None
        sent = time.perf_counter()
        reply = await client.call(SetStatusRequest(id=worker_id, status=wanted, reason="bench"))
        replied = time.perf_counter()
        assert isinstance(reply, CommandOk), reply
        assert reply.applied, reply  # a change, so an event
        at, wall = await asyncio.wait_for(seen.seen, 10)
        stamped = await asyncio.wait_for(seen.stamped, 10)
        out.send.append((at - sent) * 1000)
        out.reply.append((at - replied) * 1000)
        out.event.append((wall - stamped) * 1000)
        await asyncio.sleep(rng.uniform(0.005, 0.03))  # any phase against the heartbeats
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def register(
    client: RegistryClient, operator: RegistryClient, first: int, n: int
) -> list[str]:
    """n Ready workers owned by PRINCIPAL, never expired by the registry (label), so the idle
    scenario needs no heartbeats; in the heartbeating one they get them all the same."""
    ids: list[str] = []
    queue = list(range(first, first + n))

    async def one() -> None:
        while queue:
            i = queue.pop()
            spec = WorkerSpec(
                url=worker_url(i), models=(f"model-{i % MODELS}",), labels={HEARTBEAT_LABEL: "off"}
            )
            reply = await client.call(RegisterRequest(worker=spec))
            assert isinstance(reply, CommandOk), reply
            assert reply.worker is not None, reply
            ids.append(reply.worker.id)
            ready = await operator.call(SetStatusRequest(id=reply.worker.id, status=S.READY))
            assert isinstance(ready, CommandOk), ready

    await asyncio.gather(*(one() for _ in range(16)))
    return sorted(ids)


async def viewer_bytes(url: str, seconds: float) -> tuple[float, int, int]:
    """One dashboard viewer for `seconds`: (bytes per second after the first event, first
    event's bytes, events)."""
    first, total, events = 0, 0, 0
    async with aiohttp.ClientSession() as s, s.get(url + "/dashboard/events") as resp:
        began = time.monotonic()
        async for line in resp.content:
            if line.startswith(b"data: "):
                events += 1
                if events == 1:
                    first = len(line)
                    began = time.monotonic()
                else:
                    total += len(line)
            if time.monotonic() - began >= seconds:
                break
    return total / seconds, first, events


COLUMNS = ("send p50", "send p99", "reply p99", "event p50", "event p99", "max", "cpu")


def report(name: str, got: Latencies, cpu: str = "") -> None:
    cells = [pct(got.send, 0.5), pct(got.send, 0.99), pct(got.reply, 0.99)]
    cells += [pct(got.event, 0.5), pct(got.event, 0.99), max(got.send)]
    print(f"{name:<36}" + "".join(f"{c:>10.2f}" for c in cells) + f"{cpu:>10}", flush=True)


async def quiet_cpu(seconds: float) -> str:
    """This process's CPU share (router + this client) with no changes going on."""
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    return f"{(time.process_time() - cpu) / (time.monotonic() - wall):.0%}"


async def until(check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def start_publisher(
    url: str, shell: Any, ids: list[str], in_step: bool, churn: bool
) -> asyncio.subprocess.Process:
    flags = ("--publish", "-", "--nats", url, *(("--in-step",) if in_step else ()))
    flags += ("--churn",) if churn else ()
    publisher = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.control", *flags, stdin=asyncio.subprocess.PIPE, cwd=ROOT
    )
    assert publisher.stdin is not None
    publisher.stdin.write("".join(f"{w} {shell.view.records[w].url}\n" for w in ids).encode())
    publisher.stdin.close()
    return publisher


async def scenarios(url: str, workers: int, changes: int) -> None:
    env = {**os.environ, "NATS_URL": url, "SUBJECT_PREFIX": PREFIX}
    argv = ("-m", "services.registry", "--http-port", "0", "--log-level", "error")
    registry = await asyncio.create_subprocess_exec(sys.executable, *argv, env=env, cwd=ROOT)
    publisher: asyncio.subprocess.Process | None = None
    bus = await Bus.connect(url, "bench")
    subjects = Subjects.for_prefix(PREFIX)
    operator = RegistryClient(bus, subjects)
    owner = RegistryClient(bus, subjects, principal=PRINCIPAL)
    try:
        await until(lambda: registry.returncode is None and bus.connected, "registry", 5)
        await asyncio.sleep(1.0)  # the registry answers once it has loaded its KV bucket
        cfg = RouterConfig(nats_url=url, subject_prefix=PREFIX, http_port=0, log_level="error")
        router, stop_router = await start_in_process(serve_router, cfg)
        shell = router.service
        seen = Seen(shell)
        await bus.subscribe(subjects.registry_events, cb=seen.on_event)
        print(f"{'scenario (ms)':<36}" + "".join(f"{c:>10}" for c in COLUMNS), flush=True)
        ids = await register(owner, operator, 0, 1)
        await until(lambda: shell.view.ready_count() == 1, "the router to see 1 worker")
        report("empty fleet (1 worker)", await change_statuses(operator, seen, ids, changes))
        ids = await register(owner, operator, 1, workers - 1) + ids
        await until(lambda: shell.view.ready_count() == workers, f"{workers} ready workers")
        cpu = await quiet_cpu(2.0)
        report(f"{workers} workers, idle", await change_statuses(operator, seen, ids, changes), cpu)
        for in_step, churn in ((False, False), (True, False), (False, True)):
            publisher = await start_publisher(url, shell, ids, in_step, churn)
            await until(lambda: len(shell.view.beats) == workers, "every worker's heartbeat")
            await asyncio.sleep(2.0)  # every worker has sent some from this publisher
            beats = f"{workers} at 1 Hz, {'in step' if in_step else 'spread'}"
            if churn:  # the dashboard when every heartbeat brings a new load
                rate, first, events = await viewer_bytes(router.url, 5.0)
                print(f"dashboard feed, {beats}, load changing every beat: {rate / 1024:.1f} KiB/s")
            else:
                cpu = await quiet_cpu(3.0)
                report(beats, await change_statuses(operator, seen, ids, changes), cpu)
            if not in_step and not churn:
                watch = asyncio.create_task(viewer_bytes(router.url, 10.0))
                await asyncio.sleep(0.5)
                name = f"{beats}, 1 dashboard"
                report(name, await change_statuses(operator, seen, ids, changes))
                rate, first, events = await watch
                print(
                    f"dashboard feed, {beats}, steady load: first event {first / 1024:.0f} KiB, "
                    f"then {rate / 1024:.1f} KiB/s per viewer ({events} events in 10 s)",
                    flush=True,
                )
            publisher.terminate()
            await publisher.wait()
            publisher = None
        await stop_router()
    finally:
        for proc in (publisher, registry):
            if proc is not None:
                proc.terminate()
                await proc.wait()
        await bus.close()


async def publish(lines: list[str], url: str, in_step: bool, churn: bool) -> None:
    """Every worker's heartbeat once a second, each on its own subject with its own sequence:
    spread evenly over the second (workers started at different times), or all at once (a
    fleet started together keeps one phase); with churn, each brings a new load."""
    bus = await Bus.connect(url, "bench-heartbeats")
    subjects = Subjects.for_prefix(PREFIX)
    fleet = []
    for line in lines:
        worker_id, base = line.split()
        sequencer = Sequencer(worker_id, time.time_ns())
        fleet.append((worker_id, base, subjects.load(PRINCIPAL, worker_id), sequencer))
    ticks = 1 if in_step else 100
    start = time.monotonic()
    tick = 0
    while True:
        for i in range(tick % ticks, len(fleet), ticks):
            worker_id, worker_url_, subject, sequencer = fleet[i]
            model = ModelLoad(
                id=f"model-{i % MODELS}",
                in_flight=(tick if churn else i) % 3,
                queue_depth=0,
                max_in_flight=8,
                max_queue_depth=16,
                service_s=0.5,
                prefill_tokens_per_s=5000.0,
            )
            load = WorkerLoad(worker_id=worker_id, url=worker_url_, status=S.READY, models=(model,))
            await bus.publish(subject, codec.encode(sequencer.stamp(load, time.time())))
        tick += 1
        await asyncio.sleep(max(0.0, start + tick / ticks - time.monotonic()))


async def main(workers: int, changes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "js")
        url = server.start()
        try:
            await scenarios(url, workers, changes)
        finally:
            server.stop()


def run(coro: Any) -> None:
    try:
        import uvloop  # the services run on it
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--publish", help=argparse.SUPPRESS)  # "-": worker ids and URLs on stdin
    parser.add_argument("--nats", help=argparse.SUPPRESS)
    parser.add_argument("--in-step", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--churn", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish is not None:
        run(publish(sys.stdin.read().splitlines(), args.nats, args.in_step, args.churn))
    else:
        run(main(args.workers, args.changes))
