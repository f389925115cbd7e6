"""Service run loop: SIGINT/SIGTERM set a stop Event, the service drains, the process exits."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from services.common.errors import ServiceError

if TYPE_CHECKING:
    from services.common.http import HttpServer

log = logging.getLogger(__name__)

ServiceMain = Callable[[asyncio.Event], Awaitable[None]]

# Set while a service runs as its own process (service_main): only then is the process's garbage
# collector its to tune (tests run services inside pytest's process).
_owns_process: ContextVar[bool] = ContextVar("owns_process", default=False)
# Container allocations between two young-generation collections (CPython's default: 700).
GEN0_THRESHOLD = 50_000


def tune_gc_for_serving() -> None:
    """Cheaper garbage collection for a started server; called once, when startup is done.

    Why: every request allocates hundreds of container objects (ASGI messages, header lists,
    futures, decoded Structs) that reference counting frees; at the default threshold the cyclic
    collector still runs every few requests, and each older-generation pass walks everything the
    process built at start (modules, the app, its views) again. Measured on the router: ~13% of
    its CPU. gc.freeze() moves what is alive now (after one last collection, so no startup
    garbage is kept) into a generation no collection visits; the higher threshold makes young
    collections rare (real cycles are few, so little memory waits for them).
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def _main(service: ServiceMain) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    await service(stop)


def run_service(service: ServiceMain) -> int:
    """Run service(stop) on uvloop (if installed) until it returns; 0 if clean, 1 on a crash.

    A ServiceError (NATS unreachable, a model that cannot load) is one log line, no traceback.
    """
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_main(service))
    except ServiceError as exc:  # raised on purpose with a message that says it all
        log.error("%s", exc)
        return 1
    except Exception:
        log.exception("service crashed")
        return 1
    return 0


async def wait_stop_or(stop: asyncio.Event, task: asyncio.Future[Any]) -> None:
    """Return when stop is set or task ends (re-raising its error), whichever comes first."""
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({stopper, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task in done:
        task.result()


async def every(interval_s: float, action: Callable[[], Awaitable[Any]], name: str) -> None:
    """Run action every interval_s until cancelled; an exception is logged and the loop goes on."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await action()
        except Exception:
            log.exception("%s failed", name)


async def cancel_and_wait(*tasks: asyncio.Task[Any], retry_s: float = 0.5) -> None:
    """Cancel until each task is really done.

    On Python 3.11 asyncio.wait_for (used inside nats-py) can swallow a cancellation when its
    inner future completes at the same moment; one cancel() is then lost and the task runs on.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)


class _HasLogging(Protocol):
    @property
    def log_level(self) -> str: ...
    @property
    def log_format(self) -> str: ...


C = TypeVar("C", bound=_HasLogging)


def service_main(
    name: str,
    load: Callable[[Sequence[str], Mapping[str, str]], C],
    serve: Callable[[C, asyncio.Event], Awaitable[None]],
) -> int:
    """Body of every `python -m services.<name>`: config (exit 2 naming the field), logs, run."""
    import os

    from services.common.errors import ConfigError
    from services.common.logging import setup_logging

    try:
        cfg = load(sys.argv[1:], os.environ)
    except ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    setup_logging(name, cfg.log_level, cfg.log_format)
    _owns_process.set(True)  # the service's task runs in a copy of this context
    return run_service(lambda stop: serve(cfg, stop))


# ---- the one skeleton of every service's serve() ----

S = TypeVar("S")


class Running(Generic[S]):
    """A started service as tests, benchmarks and `up` hold it: its service and HTTP server."""

    def __init__(self, service: S, http: HttpServer) -> None:
        self.service, self.http = service, http

    @property
    def port(self) -> int:
        return self.http.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"


class Tasks:
    """The background loops a service starts; they are cancelled after its HTTP server stopped."""

    def __init__(self, group: asyncio.TaskGroup) -> None:
        self.group = group
        self.started: list[asyncio.Task[Any]] = []

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self.group.create_task(coro)
        self.started.append(task)
        return task


async def run_until_stopped(
    http: HttpServer,
    stop: asyncio.Event,
    start: Callable[[Tasks], Awaitable[None]],
    drain: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve HTTP; `start` spawns the loops and returns once the service is ready (it resolves
    `started` there; then a service process tunes its collector, tune_gc_for_serving); on stop:
    `drain` (refuse newcomers, let the running finish), HTTP stops (uvicorn's graceful
    shutdown), then the loops are cancelled: they serve until the last byte."""
    async with asyncio.TaskGroup() as group:
        http_task = group.create_task(http.serve())
        tasks = Tasks(group)
        await start(tasks)
        if _owns_process.get():
            tune_gc_for_serving()
        await stop.wait()
        if drain is not None:
            await drain()
        http.stop()
        await http_task
        await cancel_and_wait(*tasks.started)


# ---- running a service inside an existing event loop (tests, benchmarks) ----

Serve = Callable[[Any, asyncio.Event, "asyncio.Future[Any]"], Coroutine[Any, Any, None]]


async def start_in_process(
    serve: Serve, cfg: Any, stop_timeout_s: float = 30.0
) -> tuple[Any, Callable[[], Awaitable[None]]]:
    """Start it and wait until it is up (or raise what broke it); returns (handle, stop)."""
    stop = asyncio.Event()
    started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, stop, started))
    waiters: list[asyncio.Future[Any]] = [task, started]
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what went wrong at start

    async def stopper() -> None:
        stop.set()
        await asyncio.wait_for(task, stop_timeout_s)

    return started.result(), stopper


@contextlib.asynccontextmanager
async def in_process(serve: Serve, cfg: Any) -> AsyncIterator[Any]:
    handle, stop = await start_in_process(serve, cfg)
    try:
        yield handle
    finally:
        await stop()
