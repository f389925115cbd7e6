"""The request path past the edge: gateway slot, replica choice, send, retry, relay, one record.

Reads top to bottom in `Forwarder.handle`: an unknown model is refused before it queues; a known
one that no replica can start within its TTFT target is refused at once (deadline.py); else it
waits at the gateway until a replica can take it in time (its first choice, made as it is
admitted) or its patience is up; then each attempt sends (and a retry chooses again); a refusal or
a connection error before the first byte is retried elsewhere; the answer is relayed intact. The
request is counted and logged once, in `_finish`: a refusal as it is returned, a relayed answer
when its last byte is sent (the slot is held until then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import msgspec
from starlette.responses import Response

from schemas.codec import error_event
from schemas.prefix import PromptFields, block_hashes, prompt_text
from services.admission.gate import Abandoned, Rejected
from services.common.errors import ApiError
from services.common.http import GuardedStream, error_response
from services.common.metrics import UNKNOWN
from services.common.request_id import HEADER as REQUEST_ID
from services.common.request_id import current_request_id
from services.common.sampled_log import SampledLog
from services.router.core import Choice, FleetView, NoReplica, UnknownModel
from services.router.deadline import Placement, Targets, TooLate, patience
from services.router.gateway import Gateway
from services.router.metrics import RouterMetrics
from services.router.policy import Prompt
from services.router.rules import (
    RetryBudget,
    gateway_busy,
    no_choice_error,
    parse_retry_after,
    upstream_unreachable,
)

log = logging.getLogger(__name__)
ORIGIN = "x-switchboard-origin"
# Headers a worker's refusal must keep when relayed (status and body are kept as they are).
RELAYED = ("retry-after", "content-type")
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, asyncio.TimeoutError)
_prompt_decoder = msgspec.json.Decoder(PromptFields)


def prompt_of(body: bytes) -> Prompt:
    """The prompt's estimated tokens and block hashes, for the replica choice. A body whose
    prompt does not decode has none (the worker judges it; the body is forwarded as it is)."""
    try:
        text = prompt_text(_prompt_decoder.decode(body))
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError):
        return Prompt()
    return Prompt.of(len(text), block_hashes(text))


def router_error(err: ApiError) -> Response:
    """A refusal the router itself makes, marked as its own."""
    return error_response(err, {ORIGIN: "router"})


def upstream_headers() -> dict[str, str]:
    """The worker keeps the client's request id, so both services' log lines share it."""
    headers = {"Content-Type": "application/json"}
    rid = current_request_id()
    if rid is not None:
        headers[REQUEST_ID] = rid
    return headers


class Tally:
    """What happened to one request so far, for its one `request` log line and the metrics."""

    def __init__(self, model: str, began: float) -> None:
        self.model = model
        self.label = model  # its metrics label: UNKNOWN when no worker serves the model
        self.began = began
        self.worker = ""
        self.attempts = 0
        self.ttfb_s: float | None = None


class Forwarder:
    def __init__(
        self,
        view: FleetView,
        gateway: Gateway,
        metrics: RouterMetrics,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float],
        max_attempts: int,
        retry_budget_ratio: float,
        header_timeout_s: float,
        body_read_timeout_s: float,
        connect_timeout_s: float,
        targets: Targets | None = None,
    ) -> None:
        self.view, self.gateway, self.metrics, self.clock = view, gateway, metrics, clock
        self.targets = targets or Targets()
        self.session = session
        self.max_attempts = max_attempts
        self.budget = RetryBudget(ratio=retry_budget_ratio)
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=connect_timeout_s,
            connect=connect_timeout_s,
            sock_read=header_timeout_s,
        )
        self.body_read_timeout_s = body_read_timeout_s
        self.busy_log = SampledLog(log)

    async def handle(
        self,
        path: str,
        body: bytes,
        model: str,
        *,
        priority: int,
        gone: Callable[[], Awaitable[object]],
        began: float,
        ttft_target_s: float | None = None,
        slots: int = 1,
    ) -> Response:
        """The response to one request whose body the edge has read and checked.
        ttft_target_s: the client's own target (x-switchboard-ttft-target-s), else configured;
        slots: what it takes on a worker (n or best_of choices run at once)."""
        tally = Tally(model, began)
        if not self.view.serves(model):
            tally.label = UNKNOWN  # a made-up name must not mint a metrics series
            return self._refuse(tally, no_choice_error(UnknownModel(model)))
        prompt = prompt_of(body)  # hashed once, whatever the number of attempts
        placement = self._placement(model, priority, prompt, ttft_target_s, slots)
        if isinstance(placement, ApiError):
            return self._refuse(tally, placement)
        gate = self.gateway.gate(model)
        patience_s = None if placement is None else placement.patience_s
        fits = None if placement is None else placement.fits
        entry = gate.slot(priority, gone, patience_s=patience_s, fits=fits)
        slot = contextlib.AsyncExitStack()
        try:
            await slot.enter_async_context(entry)
        except Rejected as rejected:
            busy = rejected.busy
            return self._refuse(tally, gateway_busy(model, busy.reason, busy.retry_after_s))
        except Abandoned:  # left while queued: its place is free and no worker sees it
            self._finish(tally, 499, "router")
            return Response(status_code=499)
        try:
            answer = await self._send(path, body, tally, prompt, placement, slots)
        except BaseException as exc:  # an unexpected error must not keep the slot
            await slot.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        if isinstance(answer, Response):  # nobody took it: a worker's refusal or the router's
            await slot.aclose()
            self._finish(tally, answer.status_code, answer.headers[ORIGIN])
            return answer
        return self._relay(answer, tally, slot)

    def _placement(
        self, model: str, priority: int, prompt: Prompt, asked_s: float | None, slots: int
    ) -> Placement | ApiError | None:
        """How the request waits for its replica at the gateway, or its refusal now. None: no
        replica is eligible; the gateway cannot judge, and the first attempt's refusal says why."""
        now = self.clock()
        best = self.view.best_estimate(model, now, prompt)
        if best is None:
            return None
        target = self.targets.target_s(model, priority, asked_s)
        verdict = patience(target, best, self.gateway.max_wait_s)
        if isinstance(verdict, TooLate):
            return gateway_busy(model, "deadline", verdict.retry_after_s)
        return Placement(
            self.view,
            self.clock,
            model,
            prompt,
            deadline=now + target,
            patience_s=verdict.wait_s,
            slots=slots,
        )

    async def _send(
        self,
        path: str,
        body: bytes,
        tally: Tally,
        prompt: Prompt,
        placement: Placement | None,
        slots: int = 1,
    ) -> Response | aiohttp.ClientResponse:
        """The first worker answer that is not a refusal (to relay), else the response to send
        instead: the last worker refusal, or the router's own. One choice per attempt (the first
        one made as the gateway admitted the request, when it judged it)."""
        self.budget.request()
        tried: set[str] = set()
        refused: Response | None = None  # the last worker refusal, relayed if nobody has room
        started = time.perf_counter()
        placed = None if placement is None else placement.choice
        while True:
            choice = placed or self.view.choose(
                tally.model,
                self.clock(),
                frozenset(tried),
                need_room=bool(tried),
                prompt=prompt,
                slots=slots,
            )
            if not isinstance(choice, Choice):
                return refused if refused is not None else router_error(no_choice_error(choice))
            if tried and not self.budget.try_retry():
                spent = NoReplica(tally.model, False, "retry budget spent")
                return refused if refused is not None else router_error(no_choice_error(spent))
            tried.add(choice.worker_id)
            if choice is not placed:  # a placed one was counted as the gateway admitted it
                self.view.dispatched_to(choice.worker_id, slots)
            placed = None
            tally.worker, tally.attempts = choice.worker_id, tally.attempts + 1
            last = tally.attempts >= self.max_attempts
            try:
                resp = await self.session.post(
                    choice.url + path, data=body, timeout=self.timeout, headers=upstream_headers()
                )
            except CONNECTION_ERRORS as exc:
                log.warning("upstream %s unreachable: %r", choice.worker_id, exc)
                self.view.connection_failed(choice.worker_id, self.clock())
                if last:
                    return router_error(upstream_unreachable(repr(exc)))
                self.metrics.retries.labels("connect").inc()
                continue
            if resp.status not in (429, 503):
                tally.ttfb_s = time.perf_counter() - started
                return resp
            refused = await self._refusal(resp, choice.worker_id)
            if last:
                return refused
            self.metrics.retries.labels("busy").inc()

    async def _refusal(self, resp: aiohttp.ClientResponse, worker_id: str) -> Response:
        """A worker's 429/503, kept to relay intact; the worker cools down for its Retry-After."""
        data = await resp.read()
        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        self.view.busy(worker_id, retry_after, self.clock())
        headers = {k: v for k, v in resp.headers.items() if k.lower() in RELAYED}
        resp.release()
        return Response(data, status_code=resp.status, headers={**headers, ORIGIN: "worker"})

    def _relay(
        self, resp: aiohttp.ClientResponse, tally: Tally, slot: contextlib.AsyncExitStack
    ) -> Response:
        status = resp.status  # what the log line says: 502 when the worker fails mid-response
        content_type = resp.headers.get("Content-Type", "application/json")

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal status
            try:
                while True:
                    async with asyncio.timeout(self.body_read_timeout_s):
                        chunk = await resp.content.readany()
                    if not chunk:
                        return
                    yield chunk
            except (aiohttp.ClientError, TimeoutError) as exc:
                # After the first byte we cannot retry: end with an explicit error, never a hang.
                log.warning("upstream %s failed mid-response: %r", tally.worker, exc)
                self.view.connection_failed(tally.worker, self.clock())
                status = 502
                if content_type.startswith("text/event-stream"):
                    yield error_event(
                        f"the worker serving this stream failed: {exc!r}",
                        "server_error",
                        "upstream_failed",
                    )

        async def sent() -> None:
            resp.release()
            await slot.aclose()
            self._finish(tally, status, "worker")

        return GuardedStream(
            chunks(),
            sent,
            status_code=resp.status,
            headers={ORIGIN: "worker"},
            media_type=content_type,
        )

    def _refuse(self, tally: Tally, err: ApiError) -> Response:
        """A refusal of the router's own, recorded before it is sent (it is small)."""
        self._finish(tally, err.status, "router")
        return router_error(err)

    def _finish(self, tally: Tally, status: int, origin: str) -> None:
        """The request's one record: the metrics and its canonical `request` log line."""
        busy = status in (429, 503)
        outcome = "ok" if status < 400 else ("busy" if busy else f"http_{status}")
        m = self.metrics
        m.requests.labels(tally.label, outcome).inc()
        if busy:
            m.backpressure.labels(origin).inc()
        duration = time.perf_counter() - tally.began
        m.duration.labels(tally.label).observe(duration)
        if tally.ttfb_s is not None:
            m.ttfb.labels(tally.label).observe(tally.ttfb_s)
        extra: dict[str, object] = {
            "model": tally.model,
            "status": status,
            "origin": origin,
            "worker_id": tally.worker,
            "attempts": tally.attempts,
            "duration_ms": round(duration * 1000, 2),
        }
        if busy:  # they come by the hundred when the fleet is full
            self.busy_log.info("request", extra)
        else:
            log.info("request", extra=extra)
