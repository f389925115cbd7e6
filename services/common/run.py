"""Service run loop: SIGINT/SIGTERM set a stop Event, the service drains, the process exits."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

ServiceMain = Callable[[asyncio.Event], Awaitable[None]]


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def _main(service: ServiceMain) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    await service(stop)


def run_service(service: ServiceMain) -> int:
    """Run service(stop) on uvloop (if installed) until it returns; 0 if clean, 1 on a crash."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_main(service))
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
