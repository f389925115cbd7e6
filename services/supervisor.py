"""`switchboard up`: embedded NATS, then each service as a child process, health-gated.

Every exit is reported. What happens next is the child's on_exit: the control plane (registry,
capacity, routers) keeps no state of its own outside NATS, so it is restarted with backoff (and a
crash loop stops everything); a dead worker is left dead, so the operator sees it NotReady and the
fleet goes on. Any unplanned exit makes `up` exit non-zero at the end. Ctrl-C / SIGTERM stops the
children in reverse start order, then NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Literal

import aiohttp
import msgspec

from services.common import natsauth
from services.common.child import die_with_parent
from services.common.natsd import NatsServer

Printer = Callable[[str, str], None]


class ServiceSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One child, `python -m <module> *args`; healthy once health_url answers 200."""

    name: str
    module: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = msgspec.field(default_factory=dict)
    health_url: str | None = None
    # restart: start it again after a backoff; report: leave it dead, the fleet goes on (workers:
    # the fleet is built to survive losing them); stop: stop everything.
    on_exit: Literal["restart", "report", "stop"] = "stop"
    # Its NATS user when `up` runs the embedded server with per-role credentials.
    role: str = "operator"


def private_file(path: Path, text: str) -> Path:
    """Write a file only its owner can read (it holds credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def print_prefixed(name: str, line: str) -> None:
    sys.stdout.write(f"{name:<10} | {line}\n")
    sys.stdout.flush()


class Child:
    def __init__(
        self, spec: ServiceSpec, proc: asyncio.subprocess.Process, printer: Printer
    ) -> None:
        self.spec = spec
        self.proc = proc
        self.pump = asyncio.create_task(self._pump(printer))

    async def _pump(self, printer: Printer) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            printer(self.spec.name, raw.decode(errors="replace").rstrip("\n"))

    async def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self.pump


async def start_child(spec: ServiceSpec, base_env: dict[str, str], printer: Printer) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        spec.module,
        *spec.args,
        env={**base_env, **spec.env, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    return Child(spec, proc, printer)


async def wait_healthy(child: Child, timeout_s: float) -> None:
    """Poll the child's /healthz until it answers 200; fail if it exits or times out first."""
    if child.spec.health_url is None:
        return
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            if child.proc.returncode is not None:
                raise RuntimeError(
                    f"{child.spec.name} exited with {child.proc.returncode} at start"
                )
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(child.spec.health_url) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.spec.name} not healthy within {timeout_s:.0f}s")
            await asyncio.sleep(0.1)


class RestartBudget:
    """Backoff doubling from first_s to max_s; more than max_restarts within window_s: give up."""

    def __init__(
        self, first_s: float = 0.5, max_s: float = 8.0, max_restarts: int = 5, window_s: float = 60
    ) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.max_restarts, self.window_s = max_restarts, window_s
        self.history: dict[str, list[float]] = {}

    def delay(self, name: str, now: float) -> float | None:
        """Seconds to wait before restarting name, or None when it crashes in a loop."""
        recent = [t for t in self.history.get(name, []) if now - t < self.window_s]
        if len(recent) >= self.max_restarts:
            return None
        self.history[name] = [*recent, now]
        return min(self.first_s * 2.0 ** len(recent), self.max_s)


class Watch:
    """Waits for stop or a child's exit and applies the child's on_exit."""

    def __init__(
        self,
        children: list[Child],
        stop: asyncio.Event,
        printer: Printer,
        respawn: Callable[[ServiceSpec], Awaitable[Child]],
        budget: RestartBudget,
    ) -> None:
        self.children, self.stop, self.printer = children, stop, printer
        self.respawn, self.budget = respawn, budget
        self.health_checks: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        code = 0
        waiting = {asyncio.ensure_future(c.proc.wait()): i for i, c in enumerate(self.children)}
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            while waiting:
                done, _ = await asyncio.wait(
                    [stopper, *waiting], return_when=asyncio.FIRST_COMPLETED
                )
                if stopper in done:
                    return code
                for waiter in done:
                    index = waiting.pop(waiter)
                    code = 1
                    outcome = await self._handle_exit(index)
                    if outcome == "stop" or self.stop.is_set():
                        return code
                    if outcome == "replaced":
                        fresh = self.children[index]
                        waiting[asyncio.ensure_future(fresh.proc.wait())] = index
            return code
        finally:
            stopper.cancel()
            for waiter in waiting:
                waiter.cancel()
            for task in self.health_checks:
                task.cancel()

    async def _handle_exit(self, index: int) -> Literal["stop", "gone", "replaced"]:
        """Apply on_exit: stop everything, leave it dead, or start a new child in its place."""
        child = self.children[index]
        spec, say = child.spec, self.printer
        exited = f"{spec.name} exited with code {child.proc.returncode}"
        with contextlib.suppress(asyncio.CancelledError):
            await child.pump
        if spec.on_exit == "report":
            say("up", f"{exited}; it is not restarted, the fleet goes on without it")
            return "gone"
        delay = (
            self.budget.delay(spec.name, time.monotonic()) if spec.on_exit == "restart" else None
        )
        if delay is None:
            why = "it keeps crashing" if spec.on_exit == "restart" else "it is essential"
            say("up", f"{exited}; {why}: stopping everything")
            return "stop"
        say("up", f"{exited}; restarting it in {delay:.1f}s")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self.stop.wait()
        if self.stop.is_set():
            return "stop"
        fresh = self.children[index] = await self.respawn(spec)
        task = asyncio.create_task(self._announce(fresh))
        self.health_checks.add(task)
        task.add_done_callback(self.health_checks.discard)
        return "replaced"

    async def _announce(self, child: Child) -> None:
        try:
            await wait_healthy(child, 60.0)
            self.printer("up", f"{child.spec.name} restarted and healthy")
        except RuntimeError as exc:
            self.printer("up", f"restart of {child.spec.name}: {exc}")


async def supervise(
    specs: Sequence[ServiceSpec],
    *,
    nats_url: str | None,
    state_dir: Path,
    nats_port: int,
    stop: asyncio.Event,
    prefix: str = "fleet",
    on_ready: Callable[[], None] = lambda: None,
    printer: Printer = print_prefixed,
    health_timeout_s: float = 60.0,
    restart_budget: RestartBudget | None = None,
) -> int:
    """Run NATS (unless nats_url is given) and the children; return the process exit code."""
    nats: NatsServer | None = None
    passwords: dict[str, str] = {}
    if nats_url is None:
        passwords = {role: secrets.token_urlsafe(18) for role in natsauth.ROLES}
        config = private_file(state_dir / "nats.conf", natsauth.render_config(prefix, passwords))
        nats = NatsServer(
            state_dir / "nats",
            port=nats_port,
            config_file=config,
            on_line=lambda line: printer("nats", line),
        )
        # On this (main) thread: the parent-death signal is tied to the thread that forks.
        nats_url = nats.start()
        operator = natsauth.url_for(nats_url, "operator", passwords["operator"])
        private_file(state_dir / "operator-url", operator + "\n")
        printer(
            "up", f"embedded nats-server ready at {nats_url} (JetStream in {state_dir / 'nats'})"
        )
        printer(
            "up",
            f"one NATS user per service role; operator credentials: {state_dir / 'operator-url'}",
        )
    base_env = {**os.environ, "NATS_URL": nats_url}

    def role_env(spec: ServiceSpec) -> dict[str, str]:
        if not passwords:
            return {}
        return {"NATS_URL": natsauth.url_for(base_env["NATS_URL"], spec.role, passwords[spec.role])}

    async def spawn(spec: ServiceSpec) -> Child:
        return await start_child(spec, {**base_env, **role_env(spec)}, printer)

    children: list[Child] = []
    code = 0
    try:
        for spec in specs:
            child = await spawn(spec)
            children.append(child)
            await wait_healthy(child, health_timeout_s)
            printer("up", f"{spec.name} is healthy")
        on_ready()
        code = await Watch(children, stop, printer, spawn, restart_budget or RestartBudget()).run()
    except (RuntimeError, OSError) as exc:
        printer("up", f"start failed: {exc}")
        code = 1
    finally:
        for child in reversed(children):
            await child.stop()
        if nats is not None:
            await asyncio.to_thread(nats.stop)
        printer("up", "stopped")
    return code
