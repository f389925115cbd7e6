"""Router ingress (Starlette): OpenAI routes, API keys, body cap, gateway admission, log lines."""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from schemas import codec
from schemas.inference import ModelCard, ModelList
from services.admission.gate import Abandoned, Rejected
from services.common.http import ENVELOPE_ERRORS, HealthCheck, disconnected, ops_routes, read_capped
from services.common.metrics import UNKNOWN
from services.common.request_id import RequestIds
from services.common.sampled_log import SampledLog
from services.router.core import PriorityCaps, Refusal, UnknownModel, gateway_busy, refusal
from services.router.dashboard import dashboard_routes
from services.router.forward import Outcome, Proxy, router_refusal
from services.router.shell import RouterState

log = logging.getLogger(__name__)


class RoutingFields(msgspec.Struct, frozen=True):
    """The only parts of a request the router reads; the body is forwarded byte for byte."""

    model: str
    stream: bool = False


def bad_request(message: str, code: str, status: int = 400, param: str | None = None) -> Response:
    return router_refusal(
        Refusal(
            status=status, message=message, type="invalid_request_error", code=code, param=param
        )
    )


def create_app(
    state: RouterState,
    proxy: Proxy,
    *,
    api_keys: tuple[str, ...],
    body_limit: int,
    metrics_registry: CollectorRegistry,
    health: HealthCheck,
    dashboard_interval_s: float | None = 0.25,
    priority_caps: PriorityCaps | None = None,
) -> ASGIApp:
    """dashboard_interval_s None: no /dashboard."""
    keys = [k.encode() for k in api_keys]
    refusals = SampledLog(log)
    caps = priority_caps or PriorityCaps()

    def key_matches(given: str) -> bool:
        # Compare against every key (no early exit) so timing says nothing about which matched.
        matches = [hmac.compare_digest(given.encode(), key) for key in keys]
        return any(matches)

    def bearer(request: Request) -> str | None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return given if scheme.lower() == "bearer" else None

    def authorized(request: Request) -> bool:
        if not keys:
            return True
        given = bearer(request)
        return given is not None and key_matches(given)

    def authorized_page(request: Request) -> bool:
        """The dashboard also takes ?key=: a browser's EventSource cannot send headers."""
        return authorized(request) or key_matches(request.query_params.get("key", ""))

    def unauthorized() -> Response:
        response = router_refusal(
            Refusal(
                status=401,
                message="missing or invalid API key",
                type="authentication_error",
                code="invalid_api_key",
            )
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    def guarded(
        fn: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            if not authorized(request):
                return unauthorized()
            return await fn(request)

        return wrapped

    async def completions(request: Request) -> Response:
        began = time.perf_counter()
        try:
            body = await read_capped(request, body_limit)
        except ClientDisconnect:  # left mid-body: nobody to answer, and nothing broke here
            return Response(status_code=499)
        if body is None:
            return bad_request(f"request body exceeds {body_limit} bytes", "request_too_large", 413)
        try:
            fields = codec.decode(body, RoutingFields)
        except msgspec.ValidationError as exc:
            return bad_request(f"invalid request: {exc}", "invalid_value", param="model")
        except msgspec.DecodeError as exc:
            return bad_request(f"malformed JSON body: {exc}", "invalid_json")
        try:
            asked = int(request.headers.get("x-switchboard-priority", "0"))
        except ValueError:
            return bad_request("x-switchboard-priority must be an integer", "invalid_value")
        # Past guarded(): with keys configured the token is one of them (config ties caps to keys).
        priority = caps.allowed(asked, bearer(request) if keys else None)
        model = fields.model
        outcome = Outcome(model)
        decision = state.view.choose(model, state.clock())
        if isinstance(decision, UnknownModel):
            outcome.label = UNKNOWN
            finish(outcome, 404, "router", began)
            return router_refusal(refusal(decision))
        stack = contextlib.AsyncExitStack()
        try:
            gate = state.gate(model)
            await stack.enter_async_context(gate.slot(priority, lambda: disconnected(request)))
        except Rejected as rejected:
            finish(outcome, 503, "router", began)
            return router_refusal(
                gateway_busy(model, rejected.busy.reason, rejected.busy.retry_after_s)
            )
        except Abandoned:  # left while queued: its place is free and no worker sees it
            finish(outcome, 499, "router", began)
            return Response(status_code=499)

        async def release() -> None:
            await stack.aclose()
            finish(outcome, outcome.status, outcome.origin, began)

        return await proxy.forward(request.url.path, body, model, outcome, release)

    def finish(outcome: Outcome, status: int, origin: str, began: float) -> None:
        m = state.metrics
        label = "ok" if status < 400 else ("busy" if status in (429, 503) else f"http_{status}")
        m.requests.labels(outcome.label, label).inc()
        if status in (429, 503):
            m.backpressure.labels(origin).inc()
        duration = time.perf_counter() - began
        m.duration.labels(outcome.label).observe(duration)
        if outcome.ttfb_s is not None:
            m.ttfb.labels(outcome.label).observe(outcome.ttfb_s)
        extra: dict[str, object] = {
            "model": outcome.model,
            "status": status,
            "origin": origin,
            "worker_id": outcome.worker,
            "attempts": outcome.attempts,
            "duration_ms": round(duration * 1000, 2),
        }
        if label == "busy":  # they come by the hundred when the fleet is full
            refusals.info("request", extra)
        else:
            log.info("request", extra=extra)

    async def models(_: Request) -> Response:
        data = ModelList(data=[ModelCard(id=m) for m in state.view.models()])
        return Response(codec.encode(data), media_type="application/json")

    async def model(request: Request) -> Response:
        """One of the models /v1/models lists (those a Ready worker serves), else 404."""
        name: str = request.path_params["model"]
        if name not in state.view.models():
            return router_refusal(refusal(UnknownModel(name)))
        return Response(codec.encode(ModelCard(id=name)), media_type="application/json")

    async def readyz(_: Request) -> Response:
        ready = state.follower.synced.is_set() and not state.draining
        return JSONResponse(
            {"ready": ready, "models": state.view.models()}, status_code=200 if ready else 503
        )

    async def health_probe(_: Request) -> Response:
        """For load balancers and peer routers: 200 once the router knows the fleet."""
        synced = state.follower.synced.is_set()
        status = "draining" if state.draining else ("ok" if synced else "starting")
        body = {"status": status, "workers": len(state.view.records)}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    routes = [
        Route("/v1/chat/completions", guarded(completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        # :path, since model ids are Hugging Face names ("org/name")
        Route("/v1/models/{model:path}", guarded(model), methods=["GET"]),
        Route("/readyz", readyz),
        Route("/health", health_probe),
        *ops_routes(metrics_registry, health),
    ]
    if dashboard_interval_s is not None:
        routes += dashboard_routes(
            state, authorized_page, unauthorized, interval_s=dashboard_interval_s
        )
    # Outermost, so even Starlette's own 500 carries the request id.
    return RequestIds(Starlette(routes=routes, exception_handlers=ENVELOPE_ERRORS))
