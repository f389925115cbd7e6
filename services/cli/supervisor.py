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
child counts as healthy only when its /healthz reports the instance id this `up` gave it. The
stack is up once every router has a heartbeat from every Ready worker (else its first requests
would all go to the workers it happens to know), or after heard_timeout_s with a note.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp

from services.cli import natsauth
from services.cli.child import (
    Child,
    Printer,
    ServiceSpec,
    StartError,
    nats_user,
    print_prefixed,
    private_file,
    start_child,
    wait_healthy,
)
from services.cli.natsd import NatsServer, brief
from services.cli.watch import Liveness, RestartBudget, Watch
from services.common.errors import NatsServerError
from services.common.run import cancel_and_wait, wait_stop_or


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
    heard_timeout_s: float = 10.0,
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
        await wait_routers_heard(children, heard_timeout_s, printer)

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


async def wait_routers_heard(
    children: Sequence[Child], timeout_s: float, printer: Printer, poll_s: float = 0.1
) -> bool:
    """Until each router's /healthz says it has a fresh heartbeat from every Ready worker and
    sees as many Ready workers as are running; False (and a note) after timeout_s.

    Routers share one port: each answer names its pid, and every poll is a new connection, so
    the kernel hands polls to different routers until each has answered."""
    routers = [c for c in children if c.spec.role == "router" and c.spec.health_url]
    waiting = {c.proc.pid for c in routers}
    if not routers:
        return True
    url = routers[0].spec.health_url
    assert url is not None
    deadline = time.monotonic() + timeout_s
    last: dict[str, object] = {}
    per_try = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(
        timeout=per_try, connector=aiohttp.TCPConnector(force_close=True)
    ) as session:
        while waiting:
            workers = sum(
                1 for c in children if c.spec.role == "worker" and c.proc.returncode is None
            )
            answered = (aiohttp.ClientError, OSError, ValueError, TypeError, TimeoutError)
            with contextlib.suppress(*answered):
                async with session.get(url) as resp:
                    body = await resp.json()
                if isinstance(body, dict):
                    last = body
                    unheard = body.get("ready_without_heartbeat")
                    if unheard == 0 and int(body.get("ready_workers", 0)) >= workers:
                        waiting.discard(body.get("pid"))
            if waiting and time.monotonic() > deadline:
                printer(
                    "up",
                    f"note: after {timeout_s:g}s a router still misses workers "
                    f"({last.get('ready_workers')} Ready of {workers} running, "
                    f"{last.get('ready_without_heartbeat')} without a heartbeat); going on",
                )
                return False
            if waiting:
                await asyncio.sleep(poll_s)
    return True


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
