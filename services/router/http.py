"""Router edge (Starlette): OpenAI routes, API keys, the body and its routing fields, priority,
the client's TTFT target.

A completion request's path goes on in forward.py (gateway, choice, send, relay, its log line).
"""

from __future__ import annotations

import math
import time

import msgspec
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from schemas import codec
from schemas.inference import MAX_N, ModelCard, ModelList
from services.common.errors import Refused, invalid
from services.common.http import (
    ENVELOPE_ERRORS,
    BearerAuth,
    HealthCheck,
    decode_body,
    disconnected,
    ops_routes,
    read_body,
)
from services.common.request_id import RequestIds
from services.router.core import UnknownModel
from services.router.dashboard import dashboard_routes
from services.router.forward import ORIGIN, Forwarder, router_error
from services.router.rules import PriorityCaps, no_choice_error
from services.router.shell import RouterShell

PRIORITY = "x-switchboard-priority"
TTFT_TARGET = "x-switchboard-ttft-target-s"


MAX_SLOTS = MAX_N  # the most choices a request may ask for


class RoutingFields(msgspec.Struct, frozen=True):
    """The only parts of a request the router reads; the body is forwarded byte for byte."""

    model: str
    stream: bool = False
    # Choices run at once on the worker, each in a slot. Read leniently: the worker judges the
    # values (a bad one is its 400), the router only counts plausible ones.
    n: object = 1
    best_of: object = None

    @property
    def slots(self) -> int:
        """What the request takes on a worker: its n (or best_of) when that is a plausible
        count, else 1 (the worker refuses it anyway)."""
        counts = [c for c in (self.n, self.best_of) if type(c) is int and 1 <= c <= MAX_SLOTS]
        return max(counts, default=1)


def asked_priority(request: Request) -> int:
    try:
        return int(request.headers.get(PRIORITY, "0"))
    except ValueError:
        raise Refused(invalid(f"{PRIORITY} must be an integer")) from None


def asked_ttft_target_s(request: Request) -> float | None:
    """The client's own TTFT target in seconds (a positive number), or None: the configured one."""
    raw = request.headers.get(TTFT_TARGET)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        message = f"{TTFT_TARGET} must be a positive number of seconds"
        raise Refused(invalid(message, param=TTFT_TARGET))
    return value


def create_app(
    shell: RouterShell,
    forwarder: Forwarder,
    *,
    api_keys: tuple[str, ...],
    body_limit: int,
    metrics_registry: CollectorRegistry,
    health: HealthCheck,
    dashboard_interval_s: float | None = 0.25,
    priority_caps: PriorityCaps | None = None,
) -> ASGIApp:
    """dashboard_interval_s None: no /dashboard."""
    auth = BearerAuth(api_keys, headers={ORIGIN: "router"})  # its 401s marked as the router's
    caps = priority_caps or PriorityCaps()

    def authorized_page(request: Request) -> bool:
        """The dashboard also takes ?key=: a browser's EventSource cannot send headers."""
        return auth.allows(request) or auth.matches(request.query_params.get("key", ""))

    async def completions(request: Request) -> Response:
        began = time.perf_counter()
        try:
            body = await read_body(request, body_limit)
            fields = decode_body(body, RoutingFields)
            # Past auth.guard(): with keys configured the token is one of them (config ties
            # caps to keys).
            key = auth.token(request) if auth.tokens else None
            priority = caps.allowed(asked_priority(request), key)
            ttft_target_s = asked_ttft_target_s(request)
        except Refused as refused:  # not yet a request for a model: neither logged nor counted
            return router_error(refused.error)
        return await forwarder.handle(
            request.url.path,
            body,
            fields.model,
            priority=priority,
            gone=lambda: disconnected(request),
            began=began,
            ttft_target_s=ttft_target_s,
            slots=fields.slots,
        )

    async def models(_: Request) -> Response:
        data = ModelList(data=[ModelCard(id=m) for m in shell.view.models()])
        return Response(codec.encode(data), media_type="application/json")

    async def model(request: Request) -> Response:
        """One of the models /v1/models lists (those a Ready worker serves), else 404."""
        name: str = request.path_params["model"]
        if name not in shell.view.models():
            return router_error(no_choice_error(UnknownModel(name)))
        return Response(codec.encode(ModelCard(id=name)), media_type="application/json")

    async def readyz(_: Request) -> Response:
        ready = shell.synced and not shell.draining
        return JSONResponse(
            {"ready": ready, "models": shell.view.models()}, status_code=200 if ready else 503
        )

    async def health_probe(_: Request) -> Response:
        """For load balancers and peer routers: 200 once the router knows the fleet."""
        status = "draining" if shell.draining else ("ok" if shell.synced else "starting")
        body = {"status": status, **shell.heard()}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    routes = [
        Route("/v1/chat/completions", auth.guard(completions), methods=["POST"]),
        Route("/v1/completions", auth.guard(completions), methods=["POST"]),
        Route("/v1/models", auth.guard(models), methods=["GET"]),
        # :path, since model ids are Hugging Face names ("org/name")
        Route("/v1/models/{model:path}", auth.guard(model), methods=["GET"]),
        Route("/readyz", readyz),
        Route("/health", health_probe),
        *ops_routes(metrics_registry, health),
    ]
    if dashboard_interval_s is not None:
        routes += dashboard_routes(
            shell, authorized_page, auth.unauthorized, interval_s=dashboard_interval_s
        )
    # Outermost, so even Starlette's own 500 carries the request id.
    return RequestIds(Starlette(routes=routes, exception_handlers=ENVELOPE_ERRORS))
