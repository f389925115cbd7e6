"""The completion routes' edge as a plain ASGI app in front of Starlette: API key, request id,
body and its fields, priority, the client's TTFT target; then forward.py.

The router's hot path, so no Starlette Request, routing or middleware on it: a POST to one of
COMPLETIONS is answered here, everything else (other routes, other methods: their 404/405
envelopes) goes on to the Starlette app (in_front).
"""

from __future__ import annotations

import logging
import math
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.asgi import receive_body, until_disconnect
from services.common.errors import ApiError, Refused, invalid
from services.common.http import BearerAuth, bearer_token, error_response
from services.common.logging import request_id
from services.common.request_id import echoed, request_id_of
from services.router.fields import read_fields
from services.router.forward import Forwarder, router_error
from services.router.relay import Answer
from services.router.rules import PriorityCaps

log = logging.getLogger(__name__)
COMPLETIONS = frozenset({"/v1/chat/completions", "/v1/completions"})
PRIORITY = "x-switchboard-priority"
TTFT_TARGET = "x-switchboard-ttft-target-s"
# The request headers the edge reads, picked in one pass over the request's headers.
_WANTED = {
    b"authorization": "authorization",
    b"content-length": "content-length",
    PRIORITY.encode(): PRIORITY,
    TTFT_TARGET.encode(): TTFT_TARGET,
}


def asked_priority(raw: bytes | None) -> int:
    try:
        return int(raw or b"0")
    except ValueError:
        raise Refused(invalid(f"{PRIORITY} must be an integer")) from None


def asked_ttft_target_s(raw: bytes | None) -> float | None:
    """The client's own TTFT target in seconds (a positive number), or None: the configured one."""
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


def picked(headers: list[tuple[bytes, bytes]]) -> dict[str, bytes]:
    """The headers the edge reads (the first of each, as Starlette's headers.get)."""
    found: dict[str, bytes] = {}
    for key, value in headers:
        name = _WANTED.get(key)
        if name is not None and name not in found:
            found[name] = value
    return found


_INTERNAL = ApiError(
    status=500, message="internal error", type="server_error", code="internal_error"
)


def in_front(completions: ASGIApp, rest: ASGIApp) -> ASGIApp:
    """One ASGI app: a POST to COMPLETIONS goes to `completions`, anything else to `rest`."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in COMPLETIONS:
            await completions(scope, receive, send)
        else:
            await rest(scope, receive, send)

    return app


class Completions:
    """A POST to /v1/chat/completions or /v1/completions, as a plain ASGI app."""

    def __init__(
        self,
        forwarder: Forwarder,
        auth: BearerAuth,
        caps: PriorityCaps,
        *,
        body_limit: int,
    ) -> None:
        self.forwarder, self.auth, self.caps = forwarder, auth, caps
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = request_id_of(scope["headers"])
        token = request_id.set(rid)
        try:
            try:
                answer = await self.answer(scope, receive)
            except Exception:  # a bug: the envelope (as Starlette's 500), the traceback logged
                log.exception("completion request failed")
                answer = error_response(_INTERNAL)
            answer.raw_headers.append(echoed(rid))
            await answer(scope, receive, send)
        finally:
            request_id.reset(token)

    async def answer(self, scope: Scope, receive: Receive) -> Answer:
        began = time.perf_counter()
        headers = picked(scope["headers"])
        given = bearer_token(headers.get("authorization", b"").decode("latin-1"))
        if not self.auth.allows_token(given):
            return self.auth.unauthorized()
        try:
            body = await receive_body(receive, self.body_limit, headers.get("content-length"))
            fields = read_fields(body)
            # Past the key check: with keys configured the token is one of them (config ties
            # caps to keys).
            key = given if self.auth.tokens else None
            priority = self.caps.allowed(asked_priority(headers.get(PRIORITY)), key)
            ttft_target_s = asked_ttft_target_s(headers.get(TTFT_TARGET))
        except Refused as refused:  # not yet a request for a model: neither logged nor counted
            return router_error(refused.error)
        return await self.forwarder.handle(
            scope["path"],
            body,
            fields,
            priority=priority,
            gone=lambda: until_disconnect(receive),
            began=began,
            ttft_target_s=ttft_target_s,
        )
