"""`switchboard up`: embedded NATS, then each service as a child process, health-gated.

Every exit is reported. What happens next is the child's on_exit: the control plane (registry,
capacity, routers) keeps no state of its own outside NATS, so it is restarted with backoff (and a
crash loop stops everything); a dead worker is left dead, so the operator sees it NotReady and the
fleet goes on. The embedded nats-server is restarted like the control plane. A child that stops
answering its /healthz (Liveness) is killed, and its exit goes the same way. Any exit not asked
for (not 0, not the SIGTERM that asked it) makes `up` exit 1 at the end. Ctrl-C / SIGTERM (also
while the stack is starting) stops the children in reverse start order, killing any still running
after its grace_s, then NATS.

Children serve on sockets `up` bound before anything started (services/common/ports.py), and a
child counts as healthy only when its /healthz reports the instance id this `up` gave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Literal

import aiohttp
import msgspec

from services.cli import natsauth
from services.cli.child import LineCutter, die_with_parent
from services.cli.natsd import NatsServer, brief
from services.common.errors import NatsServerError, ServiceError
from services.common.run import cancel_and_wait, wait_stop_or

Printer = Callable[[str, str], None]
# A child that exits 0, or dies of the SIGTERM that asked it to stop, ended as asked.
CLEAN_EXITS = (0, -signal.SIGTERM)


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
    # The port it serves on: the child inherits the socket `up` bound for it (see ports.py).
    listen_port: int | None = None
    # How long it may take to stop after SIGTERM before it is killed (workers drain first).
    grace_s: float = 20.0


def nats_user(spec: ServiceSpec) -> str:
    """Its NATS user: its role, but each worker its own (named after it), so a worker's
    credential speaks only for that worker (its registry records, its heartbeats)."""
    return spec.name if spec.role == "worker" else spec.role


class StartError(ServiceError):
    """`up` could not start: nothing was left running."""


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


class _Output(asyncio.Protocol):
    """A child's stdout and stderr, as prefixed lines; it reads whatever comes, as it comes."""

    def __init__(self, name: str, printer: Printer) -> None:
        self.name, self.printer = name, printer
        self.lines = LineCutter()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        for line in self.lines.feed(data):
            self.printer(self.name, line)

    def connection_lost(self, exc: Exception | None) -> None:
        for line in self.lines.flush():
            self.printer(self.name, line)
        if not self.closed.done():
            self.closed.set_result(None)


class Child:
    def __init__(
        self,
        spec: ServiceSpec,
        proc: asyncio.subprocess.Process,
        output: _Output,
        pipe: asyncio.ReadTransport,
        printer: Printer,
    ) -> None:
        self.spec, self.proc, self.output, self.pipe = spec, proc, output, pipe
        self.printer = printer

    async def output_closed(self, timeout_s: float = 1.0) -> None:
        """Wait for its last words; a process it left behind may hold the pipe, so not forever."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.output.closed), timeout_s)
        self.pipe.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    async def stop(self) -> bool:
        """SIGTERM, SIGKILL after spec.grace_s; True if it ended as asked (or had already)."""
        asked = True
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), self.spec.grace_s)
                asked = self.proc.returncode in CLEAN_EXITS
            except TimeoutError:
                self.printer(
                    "up", f"{self.spec.name} did not stop within {self.spec.grace_s:g}s: killing it"
                )
                self.kill()
                await self.proc.wait()
                asked = False
        await self.output_closed()
        return asked


async def start_child(
    spec: ServiceSpec,
    base_env: dict[str, str],
    printer: Printer,
    listener: socket.socket | None = None,
) -> Child:
    env = {**base_env, **spec.env, "PYTHONUNBUFFERED": "1"}
    if listener is not None:
        env["SWITCHBOARD_LISTEN_FD"] = str(listener.fileno())
    # Our own pipe, not asyncio's PIPE: on Python 3.11 Process.wait() returns only once the
    # pipes are closed, so a child whose output is not read to the end would never be seen exit.
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            spec.module,
            *spec.args,
            env=env,
            stdout=write_fd,
            stderr=write_fd,
            start_new_session=True,
            preexec_fn=die_with_parent,
            pass_fds=() if listener is None else (listener.fileno(),),
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    output = _Output(spec.name, printer)
    pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: output, os.fdopen(read_fd, "rb", buffering=0)
    )
    return Child(spec, proc, output, pipe, printer)


async def wait_healthy(child: Child, timeout_s: float, instance: str = "") -> None:
    """Poll the child's /healthz until it answers 200; fail if it exits or times out first.

    With instance, the answer must come from a process of this `up` (another stack may answer
    on a port this one meant to use).
    """
    if child.spec.health_url is None:
        return
    deadline = time.monotonic() + timeout_s
    # Per request: a socket `up` holds accepts connections even while no child serves it.
    per_try = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=per_try) as session:
        while True:
            if child.proc.returncode is not None:
                raise RuntimeError(
                    f"{child.spec.name} exited with {child.proc.returncode} at start"
                )
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError, TimeoutError):
                async with session.get(child.spec.health_url) as resp:
                    if resp.status == 200:
                        _check_instance(child.spec, await resp.json(), instance)
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.spec.name} not healthy within {timeout_s:.0f}s")
            await asyncio.sleep(0.1)


def _check_instance(spec: ServiceSpec, body: object, instance: str) -> None:
    got = body.get("instance") if isinstance(body, dict) else None
    if instance and got != instance:
        raise RuntimeError(
            f"{spec.name}: {spec.health_url} is answered by another process "
            f"(instance {got!r}, this `up` is {instance!r})"
        )


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
    listeners: dict[int, socket.socket] | None = None,
    liveness: Liveness | None = None,
) -> int:
    """Run NATS (unless nats_url is given) and the children; return the process exit code:
    0 when every child (and NATS) ended as asked, else 1.

    listeners: sockets bound for the children's listen_port (ports.claim); the one on nats_port
    is released just before nats-server binds it. StartError when NATS does not start.
    """
    listeners = {} if listeners is None else listeners
    instance = secrets.token_hex(6)
    users = dict.fromkeys([*natsauth.SERVICE_USERS, *(nats_user(spec) for spec in specs)])
    nats, nats_url, passwords = _start_nats(
        nats_url, state_dir, nats_port, prefix, listeners, printer, tuple(users)
    )
    base_env = {**os.environ, "NATS_URL": nats_url, "SWITCHBOARD_INSTANCE": instance}
    base_env.pop("SWITCHBOARD_LISTEN_FD", None)

    def role_env(spec: ServiceSpec) -> dict[str, str]:
        if not passwords:
            return {}
        user = nats_user(spec)
        env = {"NATS_URL": natsauth.url_for(base_env["NATS_URL"], user, passwords[user])}
        if spec.role == "worker":  # its principal is its user, whatever the environment says
            env["WORKER_PRINCIPAL"] = user
        return env

    async def spawn(spec: ServiceSpec) -> Child:
        port = spec.listen_port
        held = None if port is None else listeners.get(port)
        child = await start_child(spec, {**base_env, **role_env(spec)}, printer, held)
        if port is not None and held is not None and spec.on_exit == "report":
            # Never restarted: once it dies its port must refuse connections (routers fail
            # over at once) instead of queueing them on a socket nobody serves.
            listeners.pop(port).close()
        return child

    children: list[Child] = []

    async def start_all() -> None:
        for spec in specs:
            child = await spawn(spec)
            children.append(child)
            await wait_healthy(child, health_timeout_s, instance)
            printer("up", f"{spec.name} is healthy")

    code = 0
    try:
        starting = asyncio.ensure_future(start_all())
        await wait_stop_or(stop, starting)  # Ctrl-C works while the stack is starting, too
        if not starting.done():
            await cancel_and_wait(starting)
        else:
            on_ready()
            budget = restart_budget or RestartBudget()
            watch = Watch(children, stop, printer, spawn, budget, instance, liveness, nats)
            code = await watch.run()
    except (RuntimeError, OSError) as exc:
        printer("up", f"start failed: {exc}")
        code = 1
    finally:
        for sock in listeners.values():  # stopping: new connections are refused, not queued
            sock.close()
        listeners.clear()
        if not await _stop_all(children):
            code = 1
        if nats is not None:
            await asyncio.to_thread(nats.stop)
        printer("up", "stopped")
    return code


async def _stop_all(children: Sequence[Child]) -> bool:
    """In reverse start order, each role's children at once (workers drain side by side);
    True if every one ended as asked."""
    clean = True
    for _, group in itertools.groupby(reversed(children), key=lambda child: child.spec.role):
        clean = all(await asyncio.gather(*(child.stop() for child in group))) and clean
    return clean


def _start_nats(
    nats_url: str | None,
    state_dir: Path,
    nats_port: int,
    prefix: str,
    listeners: dict[int, socket.socket],
    printer: Printer,
    users: Sequence[str] = natsauth.ROLES,
) -> tuple[NatsServer | None, str, dict[str, str]]:
    """The embedded nats-server with one NATS user per service role and per worker (unless
    nats_url is given); records the operator's URL in state_dir (OPERATOR_URL_FILE) either way, for
    `switchboard status` and friends."""
    if nats_url is not None:
        private_file(state_dir / natsauth.OPERATOR_URL_FILE, nats_url + "\n")
        return None, nats_url, {}
    passwords = {user: secrets.token_urlsafe(18) for user in users}
    config = private_file(state_dir / "nats.conf", natsauth.render_config(prefix, passwords))

    def show(line: str) -> None:
        shown = brief(line)
        # The config `up` writes (0600, fresh passwords each run) holds them in plain text on
        # purpose; nats-server warns about that every start.
        if shown is not None and "Plaintext passwords detected" not in shown:
            printer("nats", shown)

    nats = NatsServer(state_dir / "nats", port=nats_port, config_file=config, on_line=show)
    held = listeners.pop(nats_port, None)
    if held is not None:
        held.close()  # nats-server binds it itself; the port was checked free a moment ago
    try:
        # On this (main) thread: the parent-death signal is tied to the thread that forks.
        nats_url = nats.start()
    except NatsServerError as exc:
        if "address already in use" in str(exc):
            raise StartError(f"port {nats_port} is in use (--nats-port)") from None
        raise StartError(str(exc)) from None
    operator = natsauth.url_for(nats_url, "operator", passwords["operator"])
    private_file(state_dir / natsauth.OPERATOR_URL_FILE, operator + "\n")
    printer("up", f"embedded nats-server ready at {nats_url} (JetStream in {state_dir / 'nats'})")
    printer(
        "up",
        "one NATS user per service role and per worker; operator credentials: "
        f"{state_dir / natsauth.OPERATOR_URL_FILE}",
    )
    return nats, nats_url, passwords
