"""The stack as a user runs it: `switchboard up` as a subprocess with 3 sim workers."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from schemas import codec
from schemas.dashboard import FleetSnapshot
from services.cli.natsd import NatsServer
from tests.helpers import eventually, free_port, free_port_range

pytestmark = pytest.mark.e2e
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


class Stack:
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        nats: NatsServer,
        router_port: int,
        worker_port: int,
        registry_port: int,
        prefix: str,
    ) -> None:
        self.proc, self.nats, self.prefix = proc, nats, prefix
        self.router_url = f"http://127.0.0.1:{router_port}/v1"
        self.worker_port = worker_port
        self.registry_port = registry_port
        self.lines: list[str] = []

    async def pump(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip())

    async def cli(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli.main",
            *args,
            "--nats-url",
            self.nats.url,
            "--prefix",
            self.prefix,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        return out.decode()


def service_pid(module: str, port: int) -> int:
    """The service process listening on port (its command line names the module and port)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if module.encode() in argv and str(port).encode() in argv:
                return int(entry.name)
    raise AssertionError(f"no {module} on port {port}")


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    nats = NatsServer(tmp_path / "js", port=free_port())
    nats.start()
    router_port, worker_port, registry_port = free_port(), free_port_range(3), free_port()
    prefix = "e2e"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli.main",
        "up",
        "--nats-url",
        nats.url,
        "--prefix",
        prefix,
        "--workers",
        "3",
        "--engine",
        "sim",
        "--router-port",
        str(router_port),
        "--worker-base-port",
        str(worker_port),
        "--registry-port",
        str(registry_port),
        "--capacity-port",
        str(free_port()),
        "--state-dir",
        str(tmp_path / "sb"),
        env={
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "XDG_STATE_HOME": str(tmp_path / "xdg"),  # up's record of itself stays in tmp
            "WORKER_HEARTBEAT_INTERVAL_S": "0.3",
            "REGISTRY_HEARTBEAT_TTL_S": "1.5",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    s = Stack(proc, nats, router_port, worker_port, registry_port, prefix)
    pump = asyncio.create_task(s.pump())
    try:
        await eventually(lambda: any("stack is up" in line for line in s.lines), timeout_s=90)
        yield s
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 60)
        await pump
        nats.stop()


async def chat_works(client: openai.AsyncOpenAI) -> bool:
    full = await client.chat.completions.create(model="sim-model", messages=MESSAGES, max_tokens=5)
    text = ""
    async for chunk in await client.chat.completions.create(
        model="sim-model", messages=MESSAGES, max_tokens=5, stream=True
    ):
        text += "".join(c.delta.content or "" for c in chunk.choices)
    return bool(
        full.usage and full.usage.completion_tokens == 5 and text == full.choices[0].message.content
    )


async def test_fleet_survives_a_dead_worker_and_a_nats_restart(stack: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=stack.router_url, api_key="unused", max_retries=0)
    try:
        # "stack is up" came once the router had heard from every worker, not on a timeout
        assert not any("a router still misses workers" in line for line in stack.lines)
        async with (
            aiohttp.ClientSession() as s,
            s.get(stack.router_url.removesuffix("/v1") + "/healthz") as resp,
        ):
            health = await resp.json()
        assert (health["ready_workers"], health["ready_without_heartbeat"]) == (3, 0), health
        assert await chat_works(client)
        status = await stack.cli("status")
        assert sum(" ready " in f" {line} " for line in status.splitlines()) == 3, status
        assert any("live fleet page" in line for line in stack.lines)
        base = stack.router_url.removesuffix("/v1")
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/dashboard") as page:
                assert page.status == 200
            async with s.get(base + "/dashboard/events") as feed:
                async for raw in feed.content:
                    if raw.startswith(b"data: "):
                        assert len(codec.decode(raw[6:], FleetSnapshot).workers) == 3
                        break

        # kill one worker: traffic continues on the others, status shows it NotReady
        os.kill(service_pid("services.worker", stack.worker_port), signal.SIGKILL)
        for _ in range(6):
            assert await chat_works(client)

        async def marked_not_ready() -> bool:
            return "not_ready" in await stack.cli("status")

        await eventually(marked_not_ready, timeout_s=10)
        assert any(
            "it is not restarted, the fleet goes on without it" in line for line in stack.lines
        )

        # restart NATS while idle: every service reconnects and the fleet view converges
        before = len(stack.lines)
        stack.nats.stop()

        def every_service_saw_nats_go() -> bool:
            saw = {
                line.split("|")[0].strip()
                for line in stack.lines[before:]
                if "nats disconnected" in line
            }
            workers = {name for name in saw if name.startswith("worker")}
            return {"registry", "capacity", "router"} <= saw and len(workers) == 2

        # back once every live service noticed it was gone (the killed worker cannot)
        await eventually(every_service_saw_nats_go, timeout_s=10)
        stack.nats.start()

        async def converged() -> bool:
            try:
                text = await stack.cli("status")
                return sum(" ready " in f" {line} " for line in text.splitlines()) == 2
            except AssertionError:
                return False

        await eventually(converged, timeout_s=30, interval_s=1.0)

        async def routes_again() -> bool:
            try:
                return await chat_works(client)
            except openai.APIError:
                return False

        await eventually(routes_again, timeout_s=20, interval_s=0.5)

        # restart the registry (SIGKILL; `up` restarts it): no worker is lost, traffic goes on
        os.kill(service_pid("services.registry", stack.registry_port), signal.SIGKILL)
        await eventually(
            lambda: any("registry restarted and healthy" in line for line in stack.lines),
            timeout_s=30,
        )
        after = await stack.cli("status")
        assert "3 workers" in after, after  # the dead one is still on record, as NotReady
        assert sum(" ready " in f" {line} " for line in after.splitlines()) == 2, after
        assert "not_ready" in after
        assert await chat_works(client)
    finally:
        await client.close()
    stack.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(stack.proc.wait(), 60) == 1  # a worker died: up says so
