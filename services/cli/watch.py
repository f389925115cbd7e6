"""`up`'s watch over running children: restart with backoff (a crash loop stops everything), kill
a child whose /healthz stops answering (Liveness), restart the embedded nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

import aiohttp
import msgspec

from services.cli.child import (
    CLEAN_EXITS,
    Child,
    Printer,
    ServiceSpec,
    wait_healthy,
)
from services.cli.natsd import NatsServer
from services.common.errors import NatsServerError
from services.common.run import cancel_and_wait


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


class Liveness(msgspec.Struct, frozen=True, kw_only=True):
    """How a running child is checked: a probe every interval_s, each answered within timeout_s;
    misses in a row mean it is hung (any HTTP answer counts: a draining worker says 503)."""

    interval_s: float = 2.0
    timeout_s: float = 3.0
    misses: int = 3


class Watch:
    """Until stop: applies a child's on_exit when it exits, kills a child that hangs (its exit
    then takes the same way), and restarts the embedded NATS like the control plane."""

    def __init__(
        self,
        children: list[Child],
        stop: asyncio.Event,
        printer: Printer,
        respawn: Callable[[ServiceSpec], Awaitable[Child]],
        budget: RestartBudget,
        instance: str = "",
        liveness: Liveness | None = None,
        nats: NatsServer | None = None,
    ) -> None:
        self.children, self.stop, self.printer = children, stop, printer
        self.respawn, self.budget, self.instance = respawn, budget, instance
        self.liveness = liveness or Liveness()
        self.nats = nats
        self.failed = False  # an exit nobody asked for: `up` exits 1 at the end
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        """Until stop, or an exit that stops everything: 0 if every exit was as asked, else 1."""
        keepers: set[asyncio.Task[Any]] = {
            asyncio.create_task(self._keep(i)) for i in range(len(self.children))
        }
        if self.nats is not None:
            keepers.add(asyncio.create_task(self._keep_nats(self.nats)))
        for child in self.children:
            self._background(self._watch_child(child))
        stopper = asyncio.create_task(self.stop.wait())
        try:
            while keepers:
                done, pending = await asyncio.wait(
                    {stopper, *keepers}, return_when=asyncio.FIRST_COMPLETED
                )
                keepers = {t for t in pending if t is not stopper}
                if stopper in done or any(t.result() == "stop" for t in done - {stopper}):
                    break
        finally:
            await cancel_and_wait(stopper, *keepers, *self.tasks)
        return 1 if self.failed else 0

    def _background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _pause(self, delay_s: float) -> bool:
        """Wait delay_s; True if stop came first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self.stop.wait()
        return self.stop.is_set()

    async def _keep(self, index: int) -> str:
        while True:
            await self.children[index].proc.wait()
            outcome = await self._handle_exit(index)
            if outcome != "replaced":
                return outcome

    async def _handle_exit(self, index: int) -> Literal["stop", "gone", "replaced"]:
        """Apply on_exit: stop everything, leave it dead, or start a new child in its place."""
        child = self.children[index]
        spec, say = child.spec, self.printer
        code = child.proc.returncode
        self.failed = self.failed or code not in CLEAN_EXITS
        exited = f"{spec.name} exited with code {code}"
        if code in CLEAN_EXITS:
            exited += " (a clean exit)"
        await child.output_closed()  # its last words come before the report
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
        if await self._pause(delay):
            return "stop"
        fresh = self.children[index] = await self.respawn(spec)
        self._background(self._announce(fresh))
        return "replaced"

    async def _announce(self, child: Child) -> None:
        try:
            await wait_healthy(child, 60.0, self.instance)
        except RuntimeError as exc:
            self.printer("up", f"restart of {child.spec.name}: {exc}")
            child.kill()  # not serving: its exit takes the way of any other (a loop stops all)
            return
        self.printer("up", f"{child.spec.name} restarted and healthy")
        await self._watch_child(child)

    async def _watch_child(self, child: Child) -> None:
        url = child.spec.health_url
        if url is None:
            return
        per_try = aiohttp.ClientTimeout(total=self.liveness.timeout_s)
        connector = aiohttp.TCPConnector(force_close=True)  # a fresh connection per probe
        async with aiohttp.ClientSession(timeout=per_try, connector=connector) as session:

            async def answers() -> bool:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with session.get(url):
                        return True
                return False

            if await self._hung(answers, lambda: child.proc.returncode is None):
                self.printer("up", f"{child.spec.name} {self._hang_report(url)}")
                child.kill()

    async def _hung(self, probe: Callable[[], Awaitable[bool]], alive: Callable[[], bool]) -> bool:
        """Probe while alive; True once it missed liveness.misses probes in a row."""
        misses = 0
        while alive():
            await asyncio.sleep(self.liveness.interval_s)
            misses = 0 if await probe() else misses + 1
            if misses >= self.liveness.misses:
                return alive()
        return False

    def _hang_report(self, what: str) -> str:
        live = self.liveness
        return (
            f"did not answer {what} {live.misses} times in a row ({live.timeout_s:g}s each, "
            f"every {live.interval_s:g}s): it is hung, killing it"
        )

    async def _keep_nats(self, nats: NatsServer) -> str:
        while not self.stop.is_set():
            watch = self._background(self._watch_nats(nats))
            code = await asyncio.to_thread(nats.wait)
            watch.cancel()
            if self.stop.is_set():
                break
            self.failed = self.failed or code not in CLEAN_EXITS
            if not await self._restart_nats(nats, f"nats-server exited with code {code}"):
                return "stop"
        return "gone"

    async def _watch_nats(self, nats: NatsServer) -> None:
        pid, host, port = nats.pid, nats.host, nats.port

        async def answers() -> bool:
            return await _nats_answers(host, port, self.liveness.timeout_s)

        if await self._hung(answers, lambda: nats.running() and nats.pid == pid):
            self.printer("up", f"nats-server {self._hang_report(f'on port {port}')}")
            await asyncio.to_thread(nats.kill)

    async def _restart_nats(self, nats: NatsServer, exited: str) -> bool:
        """Start it again on its port with its data and config; False: it keeps crashing."""
        while True:
            delay = self.budget.delay("nats", time.monotonic())
            if delay is None:
                self.printer("up", f"{exited}; it keeps crashing: stopping everything")
                return False
            self.printer(
                "up",
                f"{exited}; restarting it in {delay:.1f}s (port {nats.port}, same data and config)",
            )
            if await self._pause(delay):
                return True
            nats.spawn()  # on this (main) thread: see services/cli/child.py
            try:
                await asyncio.to_thread(nats.wait_ready)
            except NatsServerError as exc:
                await asyncio.to_thread(nats.kill)
                exited = f"restart of nats-server failed: {exc}"
                continue
            self.printer("up", f"nats-server restarted at {nats.url}; the services reconnect")
            return True


async def _nats_answers(host: str, port: int, timeout_s: float) -> bool:
    """A live nats-server greets every new connection with its INFO line."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                return (await reader.readline()).startswith(b"INFO")
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
