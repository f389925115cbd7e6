"""Upstream forwarding: pick a replica, send, retry before the first byte, relay the rest intact."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from starlette.responses import Response

from schemas.codec import error_event
from services.common.errors import ApiError
from services.common.http import GuardedStream, error_response
from services.common.request_id import HEADER as REQUEST_ID
from services.common.request_id import current_request_id
from services.router.core import (
    Choice,
    NoReplica,
    Refusal,
    UnknownModel,
    parse_retry_after,
    refusal,
)
from services.router.shell import RouterState

log = logging.getLogger(__name__)
ORIGIN = "x-switchboard-origin"
# Headers a worker's refusal must keep when relayed (status and body are kept as they are).
RELAYED = ("retry-after", "content-type")
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, asyncio.TimeoutError)


def router_refusal(r: Refusal) -> Response:
    err = ApiError(
        status=r.status,
        message=r.message,
        type=r.type,
        code=r.code,
        param=r.param,
        retry_after_s=r.retry_after_s,
    )
    return error_response(err, {ORIGIN: "router"})


def upstream_headers() -> dict[str, str]:
    """The worker keeps the client's request id, so both services' log lines share it."""
    headers = {"Content-Type": "application/json"}
    rid = current_request_id()
    if rid is not None:
        headers[REQUEST_ID] = rid
    return headers


class Outcome:
    """What happened to one request, for the canonical log line and metrics."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.label = model  # its metrics label: UNKNOWN when no worker serves the model
        self.worker = ""
        self.attempts = 0
        self.status = 0
        self.origin = "worker"
        self.ttfb_s: float | None = None


class Proxy:
    def __init__(
        self,
        state: RouterState,
        session: aiohttp.ClientSession,
        *,
        max_attempts: int,
        header_timeout_s: float,
        body_read_timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        self.state = state
        self.session = session
        self.max_attempts = max_attempts
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=connect_timeout_s,
            connect=connect_timeout_s,
            sock_read=header_timeout_s,
        )
        self.body_read_timeout_s = body_read_timeout_s

    async def forward(
        self,
        path: str,
        body: bytes,
        model: str,
        outcome: Outcome,
        release: Callable[[], Awaitable[None]],
    ) -> Response:
        """Returns the response; `release` runs when the response is completely sent."""
        view, metrics = self.state.view, self.state.metrics
        self.state.budget.request()
        tried: set[str] = set()
        relay: Response | None = None  # the last worker refusal, relayed if nobody else has room
        started = time.perf_counter()

        async def finish(response: Response, origin: str) -> Response:
            # Record what the client gets before release() logs and counts the request.
            outcome.status, outcome.origin = response.status_code, origin
            await release()
            return response

        while True:
            decision = view.choose(
                model, self.state.clock(), frozenset(tried), need_room=bool(tried)
            )
            if not isinstance(decision, Choice):
                if relay is not None:
                    return await finish(relay, "worker")
                assert isinstance(decision, UnknownModel | NoReplica)
                return await finish(router_refusal(refusal(decision)), "router")
            if tried and not self.state.budget.try_retry():
                if relay is not None:
                    return await finish(relay, "worker")
                spent = NoReplica(model, False, "retry budget spent")
                return await finish(router_refusal(refusal(spent)), "router")
            tried.add(decision.worker_id)
            view.dispatched_to(decision.worker_id)
            outcome.worker, outcome.attempts = decision.worker_id, outcome.attempts + 1
            try:
                resp = await self.session.post(
                    decision.url + path,
                    data=body,
                    timeout=self.timeout,
                    headers=upstream_headers(),
                )
            except CONNECTION_ERRORS as exc:
                log.warning("upstream %s unreachable: %r", decision.worker_id, exc)
                view.connection_failed(decision.worker_id, self.state.clock())
                if outcome.attempts < self.max_attempts:
                    metrics.retries.labels("connect").inc()
                    continue
                unreachable = Refusal(
                    status=502,
                    message=f"upstream worker unreachable: {exc!r}",
                    type="server_error",
                    code="upstream_unreachable",
                )
                return await finish(router_refusal(unreachable), "router")
            if resp.status in (429, 503):
                data = await resp.read()
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                view.busy(decision.worker_id, retry_after, self.state.clock())
                headers = {k: v for k, v in resp.headers.items() if k.lower() in RELAYED}
                relay = Response(
                    data, status_code=resp.status, headers={**headers, ORIGIN: "worker"}
                )
                resp.release()
                if outcome.attempts < self.max_attempts:
                    metrics.retries.labels("busy").inc()
                    continue
                return await finish(relay, "worker")
            outcome.ttfb_s = time.perf_counter() - started
            return self._relay(resp, outcome, release)

    def _relay(
        self, resp: aiohttp.ClientResponse, outcome: Outcome, release: Callable[[], Awaitable[None]]
    ) -> Response:
        outcome.status = resp.status
        content_type = resp.headers.get("Content-Type", "application/json")
        headers = {ORIGIN: "worker"}

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    async with asyncio.timeout(self.body_read_timeout_s):
                        chunk = await resp.content.readany()
                    if not chunk:
                        return
                    yield chunk
            except (aiohttp.ClientError, TimeoutError) as exc:
                # After the first byte we cannot retry: end with an explicit error, never a hang.
                log.warning("upstream %s failed mid-response: %r", outcome.worker, exc)
                self.state.view.connection_failed(outcome.worker, self.state.clock())
                outcome.status = 502
                if content_type.startswith("text/event-stream"):
                    yield error_event(
                        f"the worker serving this stream failed: {exc!r}",
                        "server_error",
                        "upstream_failed",
                    )

        async def cleanup() -> None:
            resp.release()
            await release()

        return GuardedStream(
            chunks(), cleanup, status_code=resp.status, headers=headers, media_type=content_type
        )
