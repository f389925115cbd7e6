"""Run any service's `serve(cfg, stop, started)` inside the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

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
