"""The live fleet page: GET /dashboard (one static HTML page) and /dashboard/events (SSE)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from schemas import codec
from schemas.dashboard import FleetSnapshot
from services.common.http import GuardedStream
from services.router.shell import RouterShell

log = logging.getLogger(__name__)

PAGE = resources.files("services.router").joinpath("dashboard.html").read_bytes()
KEEPALIVE_S = 15.0  # an SSE comment keeps proxies from closing a quiet stream
TICK_S = 1.0  # heartbeat ages move even when nothing else does


def dashboard_routes(
    shell: RouterShell,
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
        shell.metrics.dashboard_viewers.inc()

        async def done() -> None:
            shell.metrics.dashboard_viewers.dec()

        return GuardedStream(feed(), done)

    async def feed() -> AsyncIterator[bytes]:
        """A snapshot when it changed: after every change (at most once per interval_s) and every
        TICK_S (heartbeat ages); a comment every KEEPALIVE_S when nothing changes."""
        yield b"retry: 1000\n\n"  # EventSource reconnects after 1 s if the router restarts
        last: FleetSnapshot | None = None
        sent_at = 0.0
        while not shell.draining:
            seen = shell.changes.version
            snapshot = shell.snapshot()
            now = time.monotonic()
            same = (
                last is not None
                and msgspec.structs.replace(snapshot, generated_at=last.generated_at) == last
            )  # the clock alone is no news
            if not same:
                yield b"event: fleet\ndata: " + codec.encode(snapshot) + b"\n\n"
                last, sent_at = snapshot, now
            elif now - sent_at >= KEEPALIVE_S:
                yield b": keepalive\n\n"
                sent_at = now
            # A change is shown at once; a burst of them, at most once per interval_s.
            await asyncio.sleep(interval_s)
            await shell.changes.wait(TICK_S, since=seen)

    return [Route("/dashboard", page), Route("/dashboard/events", events)]
