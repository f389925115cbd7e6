"""The request path past the edge: gateway slot, replica choice, send, retry, relay, one record.

Reads top to bottom in `Forwarder.handle`: an unknown model is refused before it queues; a known
one goes at once when a replica can take it in time (its first choice, the common case: one
question to the fleet view); else one that no replica can start within its TTFT target is
refused at once (deadline.py), and the rest wait at the gateway until a replica can take it in
time (chosen as it is admitted) or their patience is up; then each attempt sends (and a retry
chooses again); a refusal or a connection error before the first byte is retried elsewhere; the
answer is relayed intact. The request is counted and logged once (record.py): a refusal as it is
returned, a relayed answer when its last byte is sent (the slot is held until then).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from starlette.responses import Response

from schemas.codec import error_event
from services.admission.gate import Abandoned, Gate, Rejected, Slot
from services.common.errors import ApiError
from services.common.http import error_response
from services.common.metrics import UNKNOWN
from services.common.request_id import current_request_id
from services.router.core import Choice, FleetView, NoReplica, UnknownModel
from services.router.deadline import Placement, Targets, TooLate, patience
from services.router.fields import RoutingFields, prompt_of
from services.router.gateway import Gateway
from services.router.metrics import RouterMetrics
from services.router.policy import Prompt
from services.router.record import Records, Tally
from services.router.relay import Answer, Headers, Reply, Stream
from services.router.rules import (
    RetryBudget,
    gateway_busy,
    no_choice_error,
    parse_retry_after,
    upstream_unreachable,
)
from services.router.upstream import Upstream, UpstreamError, WorkerResponse

log = logging.getLogger(__name__)
ORIGIN = "x-switchboard-origin"
CONNECTION_ERRORS = (UpstreamError,)  # timeouts included (upstream.py)
# A non-streamed answer up to this size is read whole and sent with its Content-Length; a larger
# one (or one of unknown length) is relayed as it comes, so the router never holds more.
WHOLE_MAX_BYTES = 16 << 20
_WORKER = (ORIGIN.encode(), b"worker")
_SSE = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))


def router_error(err: ApiError) -> Response:
    """A refusal the router itself makes, marked as its own."""
    return error_response(err, {ORIGIN: "router"})


def upstream_failed(detail: str) -> ApiError:
    """The worker's connection broke while its (non-streamed) answer was being read."""
    return ApiError(
        status=502,
        message=f"the worker failed while sending its answer: {detail}",
        type="server_error",
        code="upstream_failed",
    )


class Forwarder:
    def __init__(
        self,
        view: FleetView,
        gateway: Gateway,
        metrics: RouterMetrics,
        upstream: Upstream,
        *,
        clock: Callable[[], float],
        max_attempts: int,
        retry_budget_ratio: float,
        body_read_timeout_s: float,
        targets: Targets | None = None,
        request_log_every: int = 1,
    ) -> None:
        """request_log_every: one in this many successful requests' `request` lines is logged."""
        self.view, self.gateway, self.metrics, self.clock = view, gateway, metrics, clock
        self.targets = targets or Targets()
        self.upstream = upstream
        self.max_attempts = max_attempts
        self.budget = RetryBudget(ratio=retry_budget_ratio)
        self.body_read_timeout_s = body_read_timeout_s
        self.records = Records(metrics, log, request_log_every)

    async def handle(
        self,
        path: str,
        body: bytes,
        fields: RoutingFields,
        *,
        priority: int,
        gone: Callable[[], Awaitable[object]],
        began: float,
        ttft_target_s: float | None = None,
    ) -> Answer:
        """The answer to one request whose body the edge has read and checked (its `fields`).
        ttft_target_s: the client's own target (x-switchboard-ttft-target-s), else configured.
        A request takes fields.slots on a worker (n or best_of choices run at once)."""
        model, slots = fields.model, fields.slots
        tally = Tally(model, began)
        if not self.view.serves(model):
            tally.label = UNKNOWN  # a made-up name must not mint a metrics series
            return self._refuse(tally, no_choice_error(UnknownModel(model)))
        prompt = prompt_of(fields)  # hashed once, whatever the number of attempts
        now = self.clock()
        target_s = self.targets.target_s(model, priority, ttft_target_s)
        placement = Placement(
            self.view, self.clock, model, prompt, deadline=now + target_s, slots=slots
        )
        slot = await self._slot(tally, placement, priority, gone, now, target_s)
        if isinstance(slot, Response):
            return slot
        try:
            answer = await self._send(path, body, tally, prompt, placement.choice, slots)
        except BaseException:  # an unexpected error must not keep the slot
            slot.release(failed=True)
            raise
        if isinstance(answer, Response):  # nobody took it: a worker's refusal or the router's
            slot.release()
            self.records.finish(tally, answer.status_code, answer.headers[ORIGIN])
            return answer
        return await self._relay(answer, tally, slot)

    async def _slot(
        self,
        tally: Tally,
        placement: Placement,
        priority: int,
        gone: Callable[[], Awaitable[object]],
        now: float,
        target_s: float,
    ) -> Slot | Response:
        """The request's gateway slot (its first replica in `placement` when one can take it
        now), or the response to send instead: refused now, or left while queued."""
        model, gate = tally.model, self.gateway.gate(tally.model)
        asked = gate.open()  # else its `fits` is not asked yet: someone waits, or no slot
        choice = placement.find() if asked else None
        # The common case, one question to the fleet view: a replica takes it in time, and the
        # arrival estimate could not refuse it (Placement.in_time; unmeasured replicas' rates,
        # peers' means over those with room or all, may differ a little: the replica that can
        # take it now is then the one believed).
        if choice is not None and placement.in_time(choice):
            return self._take(gate, placement, choice)
        # No replica can take it now (or only one the estimate must judge first): the arrival
        # estimate says whether it may wait, and how long.
        best = self.view.best_estimate(model, now, placement.prompt)
        patience_s, fits = None, None  # no replica eligible: the first attempt says why
        if best is not None:
            verdict = patience(target_s, best, self.gateway.max_wait_s)
            if isinstance(verdict, TooLate):
                return self._refuse(tally, gateway_busy(model, "deadline", verdict.retry_after_s))
            patience_s, fits = verdict.wait_s, placement.fits
        if choice is not None:
            return self._take(gate, placement, choice)
        entry = gate.slot(
            priority, gone, patience_s=patience_s, fits=fits, asked=asked and fits is not None
        )
        try:
            await entry.__aenter__()
        except Rejected as rejected:
            busy = rejected.busy
            return self._refuse(tally, gateway_busy(model, busy.reason, busy.retry_after_s))
        except Abandoned:  # left while queued: its place is free and no worker sees it
            self.records.finish(tally, 499, "router")
            return Response(status_code=499)
        return entry

    @staticmethod
    def _take(gate: Gate, placement: Placement, choice: Choice) -> Slot:
        """The slot now, the request going to `choice` (found as the gate was open; nothing has
        run since, so it still is)."""
        slot = gate.take()
        placement.take(choice)
        return slot

    async def _send(
        self,
        path: str,
        body: bytes,
        tally: Tally,
        prompt: Prompt,
        placed: Choice | None,
        slots: int = 1,
    ) -> Response | WorkerResponse:
        """The first worker answer that is not a refusal (to relay), else the response to send
        instead: the last worker refusal, or the router's own. One choice per attempt (`placed`:
        the first, made as the gateway admitted the request, when it judged it)."""
        self.budget.request()
        tried: set[str] = set()
        refused: Response | None = None  # the last worker refusal, relayed if nobody has room
        started = time.perf_counter()
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
                # The worker keeps the client's request id: both services' log lines share it.
                resp = await self.upstream.post(choice.url, path, body, current_request_id())
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

    async def _refusal(self, resp: WorkerResponse, worker_id: str) -> Response:
        """A worker's 429/503, kept to relay intact (status, body, Retry-After, Content-Type);
        the worker cools down for its Retry-After."""
        try:
            data = await resp.read(self.body_read_timeout_s)
        except UpstreamError as exc:  # the refusal stands; its body is lost
            log.warning("upstream %s failed sending its refusal: %r", worker_id, exc)
            data = b""
        finally:
            resp.release()
        self.view.busy(worker_id, parse_retry_after(resp.retry_after), self.clock())
        headers = {ORIGIN: "worker"}
        if resp.retry_after is not None:
            headers["retry-after"] = resp.retry_after
        if resp.content_type is not None:
            headers["content-type"] = resp.content_type
        return Response(data, status_code=resp.status, headers=headers)

    async def _relay(self, resp: WorkerResponse, tally: Tally, slot: Slot) -> Answer:
        """The worker's answer as the client gets it: a stream (SSE, or too large to hold) is
        relayed as it comes; anything else is read whole and sent with its Content-Length."""
        content_type = resp.content_type or "application/json"
        sse = content_type.startswith("text/event-stream")
        size = resp.content_length
        if sse or size is None or size > WHOLE_MAX_BYTES:
            return self._stream(resp, tally, slot, content_type, sse)
        try:
            data = await resp.read(self.body_read_timeout_s)
        except UpstreamError as exc:
            resp.release()  # its connection is closed: the answer was not read to its end
            self._upstream_failed(tally, exc)
            slot.release()
            return self._refuse(tally, upstream_failed(repr(exc)))
        status = resp.status
        resp.release()

        async def sent() -> None:
            slot.release()
            self.records.finish(tally, status, "worker")

        headers = [(b"content-type", content_type.encode("latin-1")), _WORKER]
        return Reply(status, headers, data, sent)

    def _stream(
        self, resp: WorkerResponse, tally: Tally, slot: Slot, content_type: str, sse: bool
    ) -> Stream:
        def failed(exc: BaseException) -> bytes:
            # After the first byte we cannot retry: end with an explicit error, never a hang.
            self._upstream_failed(tally, exc)
            if not sse:
                return b""
            message = f"the worker serving this stream failed: {exc!r}"
            return error_event(message, "server_error", "upstream_failed")

        async def sent(status: int) -> None:  # status: 502 when the worker failed mid-answer
            slot.release()
            self.records.finish(tally, status, "worker")

        headers: Headers = [(b"content-type", content_type.encode("latin-1"))]
        if sse:
            headers += _SSE
        headers.append(_WORKER)
        return Stream(resp, headers, idle_s=self.body_read_timeout_s, failed=failed, done=sent)

    def _upstream_failed(self, tally: Tally, exc: BaseException) -> None:
        log.warning("upstream %s failed mid-response: %r", tally.worker, exc)
        self.view.connection_failed(tally.worker, self.clock())

    def _refuse(self, tally: Tally, err: ApiError) -> Response:
        """A refusal of the router's own, recorded before it is sent (it is small)."""
        self.records.finish(tally, err.status, "router")
        return router_error(err)
