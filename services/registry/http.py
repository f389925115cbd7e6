"""Registry admin HTTP API (Starlette): the registry commands over REST, behind a bearer token."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from schemas import codec
from schemas.registry import (
    Command,
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
from services.common.errors import ApiError, Refused, invalid
from services.common.http import (
    ENVELOPE_ERRORS,
    BearerAuth,
    HealthCheck,
    decode_body,
    error_response,
    ops_routes,
    read_body,
)

T = TypeVar("T")
Dispatch = Callable[[Command], Awaitable[CommandReply]]  # Registry.dispatch, operator rights

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


def to_response(result: CommandReply, created_status: int = 200) -> Response:
    if isinstance(result, CommandError):
        err = ApiError(
            status=ERROR_STATUS[result.code],
            message=result.message,
            type=ERROR_TYPE[result.code],
            code=result.code,
            param=result.field,
        )
        return error_response(err)
    assert isinstance(result, CommandOk)
    if result.worker is None:
        body = codec.encode({"workers": result.workers})
        return Response(body, status_code=200, media_type="application/json")
    status = created_status if result.applied else 200
    body = codec.encode({"worker": result.worker, "applied": result.applied})
    return Response(body, status_code=status, media_type="application/json")


async def read_json(request: Request, type_: type[T], limit: int) -> T:
    return decode_body(await read_body(request, limit), type_)


def _path_id(request: Request) -> str:
    worker_id = request.path_params["worker_id"]
    try:
        return msgspec.convert({"id": worker_id}, GetRequest).id
    except msgspec.ValidationError as exc:
        raise Refused(invalid(f"invalid worker id: {exc}", "invalid_value", "id")) from None


def create_app(
    dispatch: Dispatch,
    *,
    admin_token: str,
    metrics_registry: CollectorRegistry,
    health: HealthCheck,
    body_limit: int = 64 * 1024,
) -> Starlette:
    """The admin API; every /workers route needs `Authorization: Bearer <admin_token>` if set."""

    auth = BearerAuth([admin_token], what="admin bearer token")
    guarded = auth.guard

    async def collection(request: Request) -> Response:
        if request.method == "GET":
            return to_response(await dispatch(ListRequest(model=request.query_params.get("model"))))
        spec = await read_json(request, WorkerSpec, body_limit)
        if request.query_params.get("upsert", "").lower() in ("1", "true", "yes"):
            return to_response(await dispatch(UpsertRequest(worker=spec)), created_status=200)
        return to_response(await dispatch(RegisterRequest(worker=spec)), created_status=201)

    async def item(request: Request) -> Response:
        worker_id = _path_id(request)
        if request.method == "GET":
            return to_response(await dispatch(GetRequest(id=worker_id)))
        if request.method == "PUT":
            spec = await read_json(request, WorkerSpec, body_limit)
            return to_response(await dispatch(ReplaceRequest(id=worker_id, worker=spec)))
        if request.method == "PATCH":
            patch = await read_json(request, StatusPatch, body_limit)
            req = SetStatusRequest(
                id=worker_id,
                status=patch.status,
                expected_revision=patch.expected_revision,
                reason=patch.reason or "admin",
            )
            return to_response(await dispatch(req))
        result = await dispatch(RemoveRequest(id=worker_id, reason="admin"))
        if isinstance(result, CommandOk):
            return Response(status_code=204)
        return to_response(result)

    routes = [
        Route("/workers", guarded(collection), methods=["GET", "POST"]),
        Route("/workers/{worker_id}", guarded(item), methods=["GET", "PUT", "PATCH", "DELETE"]),
        *ops_routes(metrics_registry, health),
    ]
    return Starlette(routes=routes, exception_handlers=ENVELOPE_ERRORS)
