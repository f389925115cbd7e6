"""Registry admin HTTP API (Starlette): the registry commands over REST, behind a bearer token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from schemas import codec
from schemas.registry import (
    CommandError,
    CommandOk,
    CommandReply,
    GetRequest,
    ListRequest,
    RegisterRequest,
    RemoveRequest,
    ReplaceRequest,
    SetStatusRequest,
    UpsertRequest,
    WorkerSpec,
    WorkerStatus,
)
from services.common.http import (
    ENVELOPE_ERRORS,
    HealthCheck,
    error_response,
    ops_routes,
    read_capped,
)

Dispatch = Callable[[str, Any], Awaitable[CommandReply]]

# The one table from typed registry errors to HTTP.
ERROR_STATUS = {"conflict": 409, "not_found": 404, "invalid": 400, "unavailable": 503}
ERROR_TYPE = {
    "conflict": "conflict_error",
    "not_found": "not_found_error",
    "invalid": "invalid_request_error",
    "unavailable": "service_unavailable_error",
}


class StatusPatch(msgspec.Struct, frozen=True, kw_only=True):
    status: WorkerStatus
    expected_revision: int | None = None
    reason: str = ""


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def to_response(result: CommandReply, created_status: int = 200) -> Response:
    if isinstance(result, CommandError):
        return error_response(
            ERROR_STATUS[result.code],
            result.message,
            ERROR_TYPE[result.code],
            result.code,
            result.field,
        )
    assert isinstance(result, CommandOk)
    if result.worker is None:
        body = codec.encode({"workers": result.workers})
        return Response(body, status_code=200, media_type="application/json")
    status = created_status if result.applied else 200
    body = codec.encode({"worker": result.worker, "applied": result.applied})
    return Response(body, status_code=status, media_type="application/json")


async def read_json(request: Request, type_: type[Any], limit: int) -> Any:
    try:
        body = await read_capped(request, limit)
    except ClientDisconnect:  # left mid-body: answered for form's sake, nobody reads it
        raise BadRequest(499, "client left before sending the whole body") from None
    if body is None:
        raise BadRequest(413, f"request body larger than {limit} bytes")
    try:
        return codec.decode(body, type_)
    except msgspec.ValidationError as exc:
        raise BadRequest(400, f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(400, f"malformed JSON: {exc}") from None


def _path_id(request: Request) -> str:
    worker_id = request.path_params["worker_id"]
    try:
        return msgspec.convert({"id": worker_id}, GetRequest).id
    except msgspec.ValidationError as exc:
        raise BadRequest(400, f"invalid worker id: {exc}", "id") from None


def create_app(
    dispatch: Dispatch,
    *,
    admin_token: str,
    metrics_registry: CollectorRegistry,
    health: HealthCheck,
    body_limit: int = 64 * 1024,
) -> Starlette:
    """The admin API; every /workers route needs `Authorization: Bearer <admin_token>` if set."""

    def authorized(request: Request) -> bool:
        if not admin_token:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.encode(), admin_token.encode()
        )

    def guarded(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            if not authorized(request):
                return error_response(
                    401,
                    "missing or wrong admin bearer token",
                    "authentication_error",
                    "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            try:
                return await handler(request)
            except BadRequest as exc:
                code = "request_too_large" if exc.status == 413 else "invalid"
                return error_response(
                    exc.status, str(exc), "invalid_request_error", code, exc.param
                )

        return wrapped

    async def collection(request: Request) -> Response:
        if request.method == "GET":
            return to_response(
                await dispatch("list", ListRequest(model=request.query_params.get("model")))
            )
        spec = await read_json(request, WorkerSpec, body_limit)
        if request.query_params.get("upsert", "").lower() in ("1", "true", "yes"):
            return to_response(
                await dispatch("upsert", UpsertRequest(worker=spec)), created_status=200
            )
        return to_response(
            await dispatch("register", RegisterRequest(worker=spec)), created_status=201
        )

    async def item(request: Request) -> Response:
        worker_id = _path_id(request)
        if request.method == "GET":
            return to_response(await dispatch("get", GetRequest(id=worker_id)))
        if request.method == "PUT":
            spec = await read_json(request, WorkerSpec, body_limit)
            return to_response(await dispatch("replace", ReplaceRequest(id=worker_id, worker=spec)))
        if request.method == "PATCH":
            patch = await read_json(request, StatusPatch, body_limit)
            req = SetStatusRequest(
                id=worker_id,
                status=patch.status,
                expected_revision=patch.expected_revision,
                reason=patch.reason or "admin",
            )
            return to_response(await dispatch("set_status", req))
        result = await dispatch("remove", RemoveRequest(id=worker_id, reason="admin"))
        if isinstance(result, CommandOk):
            return Response(status_code=204)
        return to_response(result)

    routes = [
        Route("/workers", guarded(collection), methods=["GET", "POST"]),
        Route("/workers/{worker_id}", guarded(item), methods=["GET", "PUT", "PATCH", "DELETE"]),
        *ops_routes(metrics_registry, health),
    ]
    return Starlette(routes=routes, exception_handlers=ENVELOPE_ERRORS)
