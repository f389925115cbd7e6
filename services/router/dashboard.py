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
from schemas.dashboard import DashboardWorker, FleetDelta, FleetSnapshot
from services.common.http import GuardedStream
from services.router.shell import RouterShell

log = logging.getLogger(__name__)

PAGE = resources.files("services.router").joinpath("dashboard.html").read_bytes()
KEEPALIVE_S = 15.0  # an SSE comment keeps proxies from closing a quiet stream
TICK_S = 1.0  # heartbeats go stale with time, when nothing else happens


def news(row: DashboardWorker) -> tuple[object, ...]:
    """What of a worker's row a viewer needs sent again: all but its heartbeat's age (the page
    ages it by itself), so a heartbeat that brings the same load is no news."""
    return (row.status, row.url, row.models, row.load, row.fresh, row.cooling_down)


class Sent:
    """What one viewer holds (what its feed sent it), to send only what changed. No I/O."""

    def __init__(self, snapshot: FleetSnapshot) -> None:
        self.rows = {w.id: news(w) for w in snapshot.workers}
        self.capacity = snapshot.capacity
        self.gateway = dict(snapshot.gateway)
        self.position = (snapshot.registry_epoch, snapshot.registry_seq)

    def delta(self, snapshot: FleetSnapshot) -> FleetDelta | None:
        """What changed since the last message, now held by the viewer; None: nothing did."""
        rows = {w.id: news(w) for w in snapshot.workers}
        changed = tuple(w for w in snapshot.workers if self.rows.get(w.id) != rows[w.id])
        removed = tuple(w for w in self.rows if w not in rows)
        capacity = None if snapshot.capacity == self.capacity else snapshot.capacity
        gateway = {m: g for m, g in snapshot.gateway.items() if self.gateway.get(m) != g}
        position = (snapshot.registry_epoch, snapshot.registry_seq)
        if not (changed or removed or gateway) and capacity is None and position == self.position:
            return None
        self.rows, self.position = rows, position
        self.capacity = snapshot.capacity
        self.gateway.update(gateway)
        return FleetDelta(
            workers=changed,
            removed=removed,
            capacity=capacity,
            gateway=gateway,
            registry_epoch=position[0],
            registry_seq=position[1],
            generated_at=snapshot.generated_at,
        )


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
        """The whole fleet once, then what changed: after every change (at most once per
        interval_s) and every TICK_S (freshness lapses with time); a comment every KEEPALIVE_S
        when nothing changes."""
        yield b"retry: 1000\n\n"  # EventSource reconnects after 1 s if the router restarts
        seen = shell.changes.version
        snapshot = shell.snapshot()
        sent = Sent(snapshot)
        yield b"event: fleet\ndata: " + codec.encode(snapshot) + b"\n\n"
        sent_at = time.monotonic()
        while not shell.draining:
            # A change is shown at once; a burst of them, at most once per interval_s.
            await asyncio.sleep(interval_s)
            await shell.changes.wait(TICK_S, since=seen)
            seen = shell.changes.version
            delta = sent.delta(shell.snapshot())
            now = time.monotonic()
            if delta is not None:
                yield b"event: delta\ndata: " + codec.encode(delta) + b"\n\n"
                sent_at = now
            elif now - sent_at >= KEEPALIVE_S:
                yield b": keepalive\n\n"
                sent_at = now

    return [Route("/dashboard", page), Route("/dashboard/events", events)]
