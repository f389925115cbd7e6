"""Router edge: the Starlette app for everything but the completion routes (asgi.py, in front of
it): models, readiness, health, metrics, the dashboard, and the 404/405 envelopes.

A completion request's path goes on in asgi.py (the edge) and forward.py (gateway, choice, send,
relay, its log line).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from schemas import codec
from schemas.inference import ModelCard, ModelList
from services.common.http import ENVELOPE_ERRORS, BearerAuth, HealthCheck, ops_routes
from services.common.request_id import RequestIds
from services.router.asgi import COMPLETIONS, Completions, in_front
from services.router.core import UnknownModel
from services.router.dashboard import dashboard_routes
from services.router.fields import RoutingFields
from services.router.forward import ORIGIN, Forwarder, router_error
from services.router.rules import PriorityCaps, no_choice_error
from services.router.shell import RouterShell

__all__ = ["RoutingFields", "create_app"]


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

    completions = Completions(forwarder, auth, caps, body_limit=body_limit)
    routes = [
        # A POST to these is answered in front of this app (asgi.in_front); routed here too for
        # the other methods' 405 (Allow: POST) and a trailing slash's redirect.
        *(Route(path, completions, methods=["POST"]) for path in sorted(COMPLETIONS)),
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
    # Outermost here (the completion routes set their own), so even Starlette's own 500 carries
    # the request id.
    rest = RequestIds(Starlette(routes=routes, exception_handlers=ENVELOPE_ERRORS))
    return in_front(completions, rest)
