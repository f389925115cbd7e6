"""HTTP plumbing every service shares: /metrics and /healthz routes, uvicorn serving in-loop."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import msgspec
import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from schemas import codec
from schemas.codec import error_body
from services.common.asgi import client_gone, too_large
from services.common.errors import ApiError, Refused, invalid
from services.common.http_limits import HttpLimits, protocol_class, raise_fd_limit

T = TypeVar("T")
HealthCheck = Callable[[], Awaitable[dict[str, object]] | dict[str, object]]


def error_response(err: ApiError, headers: Mapping[str, str] | None = None) -> Response:
    """Every HTTP error leaves through here: the OpenAI envelope, JSON, and any Retry-After."""
    all_headers = dict(headers or {})
    if err.retry_after_s is not None:
        all_headers["Retry-After"] = str(err.retry_after_s)
    return Response(
        error_body(err.message, err.type, err.code, err.param),
        status_code=err.status,
        media_type="application/json",
        headers=all_headers,
    )


_STARLETTE_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _starlette_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) in the envelope, not plain text."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else None  # 405: Allow
    if status >= 500:
        internal = ApiError(
            status=status, message="internal error", type="server_error", code="internal_error"
        )
        return error_response(internal)
    detail = exc.detail if isinstance(exc, HTTPException) else ""
    code = _STARLETTE_CODES.get(status, "http_error")
    refused = ApiError(status=status, message=detail, type="invalid_request_error", code=code)
    return error_response(refused, headers)


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return error_response(exc.error)


# Every service's Starlette app takes these: no error leaves any service outside the envelope.
# (Exception: Starlette still logs the traceback and re-raises after answering.)
ENVELOPE_ERRORS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    Refused: _refused,
    HTTPException: _starlette_error,
    Exception: _starlette_error,
}


class GuardedStream(StreamingResponse):
    """A streaming response whose cleanup runs however the stream ends (even if never started)."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        cleanup: Callable[[], Awaitable[None]],
        *,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        media_type: str = "text/event-stream",
    ) -> None:
        super().__init__(
            content,
            status_code=status_code,
            media_type=media_type,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )
        self.cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.cleanup()


async def disconnected(request: Request) -> None:
    """Returns once the client has gone; only for after its body was read (uvicorn repeats it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_capped(request: Request, limit: int) -> bytes | None:
    """The body, or None when it exceeds limit (refused before reading it all)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body; Refused 413 past `limit`, 499 when the client leaves mid-body (answered
    for the log line only: nobody is left to read it)."""
    try:
        body = await read_capped(request, limit)
    except ClientDisconnect:
        raise client_gone() from None
    if body is None:
        raise too_large(limit)
    return body


# msgspec names a missing top-level field only in the message, without a `$.` path.
_MISSING = re.compile(r"^Object missing required field `(\w+)`$")


def decode_body(body: bytes, type_: type[T]) -> T:
    """JSON body to `type_`; Refused 400 (invalid_json, or invalid_value naming the field)."""
    try:
        return codec.decode(body, type_)
    except msgspec.ValidationError as exc:
        missing = _MISSING.match(str(exc))
        param = missing.group(1) if missing else codec.error_field(str(exc))
        raise Refused(invalid(f"invalid request: {exc}", "invalid_value", param)) from None
    except msgspec.DecodeError as exc:
        raise Refused(invalid(f"malformed JSON body: {exc}", "invalid_json")) from None


Handler = Callable[[Request], Awaitable[Response]]


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header's value, else None."""
    scheme, _, given = authorization.partition(" ")
    return given if scheme.lower() == "bearer" else None


class BearerAuth:
    """`Authorization: Bearer <token>` against a set of tokens; no tokens: everyone is let in.
    `headers`: added to its 401 (the router marks every refusal of its own)."""

    def __init__(
        self,
        tokens: Iterable[str],
        what: str = "API key",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.tokens = [t.encode() for t in tokens if t]
        self.what = what
        self.headers = {"WWW-Authenticate": "Bearer", **(headers or {})}

    def token(self, request: Request) -> str | None:
        return bearer_token(request.headers.get("authorization", ""))

    def matches(self, given: str) -> bool:
        # Compare against every token (no early exit) so timing says nothing about which matched.
        results = [hmac.compare_digest(given.encode(), token) for token in self.tokens]
        return any(results)

    def allows(self, request: Request) -> bool:
        return self.allows_token(self.token(request) if self.tokens else None)

    def allows_token(self, given: str | None) -> bool:
        """Whether a request bearing `given` (bearer_token's) is let in."""
        if not self.tokens:
            return True
        return given is not None and self.matches(given)

    def unauthorized(self) -> Response:
        refused = ApiError(
            status=401,
            message=f"missing or invalid {self.what}",
            type="authentication_error",
            code="invalid_api_key",
        )
        return error_response(refused, self.headers)

    def guard(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if not self.allows(request):
                return self.unauthorized()
            return await handler(request)

        return guarded


def ops_routes(registry: CollectorRegistry, health: HealthCheck) -> list[BaseRoute]:
    """/metrics (Prometheus text) and /healthz (200 with details, 503 when unhealthy)."""

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        result = health()
        details = await result if asyncio.iscoroutine(result) else result
        assert isinstance(details, dict)
        ok = bool(details.get("ok", True))
        return JSONResponse(details, status_code=200 if ok else 503)

    return [Route("/metrics", metrics), Route("/healthz", healthz)]


def ops_app(registry: CollectorRegistry, health: HealthCheck) -> Starlette:
    return Starlette(routes=ops_routes(registry, health), exception_handlers=ENVELOPE_ERRORS)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: services own SIGINT/SIGTERM (see run.py)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """Bind before serving so port 0 resolves to a real port callers can read at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted sockets only when it does, and
    # without it every keep-alive response waits ~40 ms for the peer's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # several processes share the port; the kernel spreads connections
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


DEFAULT_LIMITS = HttpLimits()


class HttpServer:
    """uvicorn on an already bound socket, run as a task, stopped gracefully; see http_limits."""

    def __init__(
        self,
        app: ASGIApp,
        sock: socket.socket,
        keep_alive_s: int = 75,
        limits: HttpLimits = DEFAULT_LIMITS,
    ) -> None:
        self.sock = sock
        # room for every connection plus what the process holds besides (NATS, upstream pools)
        raise_fd_limit(limits.max_connections + 1024)
        config = uvicorn.Config(
            app,
            http=protocol_class(limits),
            ws="none",  # no service speaks WebSocket; an upgraded one would escape the limits
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_keep_alive=keep_alive_s,
            timeout_graceful_shutdown=30,
        )
        self._server = _Server(config)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    async def wait_started(self) -> None:
        """Until uvicorn accepts connections (serve() must be running)."""
        while not self.started:  # noqa: ASYNC110 - uvicorn exposes only a flag
            await asyncio.sleep(0.01)

    async def serve(self) -> None:
        await self._server.serve(sockets=[self.sock])

    def stop(self) -> None:
        self._server.should_exit = True
