"""The live fleet page: GET /dashboard (one static HTML page) and /dashboard/events (SSE)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from schemas import codec
from services.common.http import GuardedStream
from services.router.state import RouterState

log = logging.getLogger(__name__)

PAGE = resources.files("services.router").joinpath("dashboard.html").read_bytes()
KEEPALIVE_S = 15.0  # an SSE comment keeps proxies from closing a quiet stream
TICK_S = 1.0  # heartbeat ages move even when nothing else does


def dashboard_routes(
    state: RouterState,
    authorized: Callable[[Request], bool],
    refuse: Callable[[], Response],
    *,
    interval_s: float,
) -> list[BaseRoute]:
    """authorized also accepts ?key= here: a browser's EventSource cannot send headers."""

    async def page(request: Request) -> Response:
        if not authorized(request):
            return refuse()
        return Response(
            PAGE,
            media_type="text/html; charset=utf-8",
            headers={
                "Cache-Control": "no-store",
                # Everything is inline and same-origin; nothing else may load or run.
                "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'",
            },
        )

    async def events(request: Request) -> Response:
        if not authorized(request):
            return refuse()
        state.metrics.dashboard_viewers.inc()

        async def done() -> None:
            state.metrics.dashboard_viewers.dec()

        return GuardedStream(feed(), done)

    async def feed() -> AsyncIterator[bytes]:
        """A snapshot on every change (at most one per interval_s) and at least every TICK_S."""
        yield b"retry: 1000\n\n"  # EventSource reconnects after 1 s if the router restarts
        last, sent_at = b"", 0.0
        while not state.draining:
            data = codec.encode(state.snapshot())
            now = time.monotonic()
            if data != last:
                yield b"event: fleet\ndata: " + data + b"\n\n"
                last, sent_at = data, now
            elif now - sent_at >= KEEPALIVE_S:
                yield b": keepalive\n\n"
                sent_at = now
            await state.changes.wait(TICK_S)
            await asyncio.sleep(interval_s)  # coalesce a burst of changes into one update

    return [Route("/dashboard", page), Route("/dashboard/events", events)]
