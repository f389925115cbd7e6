"""Request ids: keep the caller's x-request-id (made safe) or make one; echo it; log with it."""

from __future__ import annotations

import itertools
import os
import re
import secrets
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.logging import request_id

HEADER = "x-request-id"
MAX_CHARS = 128
# What survives of a client's id: enough for uuids, ULIDs, trace ids and base64; nothing that
# could end a header or a log line, or open an escape sequence.
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/+=@-]")
_HEADER_BYTES = HEADER.encode()


class _Ids:
    """New ids: 32 lowercase hex digits (a uuid4's shape), a random prefix per process then a
    count. Unique across processes and restarts (64 random bits a process), and a fraction of a
    uuid4's cost (no urandom call per request). Guessable, which a correlation id may be: it
    grants nothing and is no secret (clients choose their own)."""

    __slots__ = ("count", "prefix")

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.count = itertools.count()

    def new(self) -> str:
        return f"{self.prefix}{next(self.count):016x}"  # 2**64 requests: never reached


_IDS = _Ids()
# A forked child is another process: its own prefix, or it would repeat its parent's ids.
os.register_at_fork(after_in_child=_IDS.renew)


def safe_request_id(given: str | None) -> str:
    """The client's id with unsafe characters removed and cut to MAX_CHARS; new if none is left."""
    kept = _UNSAFE.sub("", given[: MAX_CHARS * 4])[:MAX_CHARS] if given else ""
    return kept or _IDS.new()


def current_request_id() -> str | None:
    return request_id.get()


def request_id_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The request's id from its ASGI headers (the client's, made safe), else a new one."""
    given = next((v for k, v in headers if k == _HEADER_BYTES), None)
    return safe_request_id(None if given is None else given.decode("latin-1"))


def echoed(rid: str) -> tuple[bytes, bytes]:
    """The response header that carries the id back."""
    return (_HEADER_BYTES, rid.encode())


class RequestIds:
    """ASGI middleware: sets the request id for the request's log lines and echoes it on the
    response, whichever route answered (errors and streams included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope["headers"])
        header = echoed(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k != _HEADER_BYTES]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        token = request_id.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
