"""Plain ASGI pieces for hot routes that skip Starlette's Request: the body, within its limit, and
the client's leaving."""

from __future__ import annotations

from starlette.types import Receive

from services.common.errors import ApiError, Refused


def client_gone() -> Refused:
    """The client left before its body was whole: answered for the log line only (nobody is
    left to read it)."""
    return Refused(
        ApiError(
            status=499,
            message="client left before sending the whole body",
            type="invalid_request_error",
            code="client_gone",
        )
    )


def too_large(limit: int) -> Refused:
    return Refused(
        ApiError(
            status=413,
            message=f"request body exceeds {limit} bytes",
            type="invalid_request_error",
            code="request_too_large",
        )
    )


async def receive_body(receive: Receive, limit: int, declared: bytes | None = None) -> bytes:
    """The whole body; Refused 413 past `limit` (at once when its Content-Length, `declared`,
    says so), 499 when the client leaves mid-body."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise client_gone()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the common case: one message, no copy
        if len(body) > limit:
            raise too_large(limit)
        return body
    whole, more = bytearray(body), True
    while more:
        if len(whole) > limit:
            raise too_large(limit)
        message = await receive()
        if message["type"] == "http.disconnect":
            raise client_gone()
        whole += message.get("body", b"")
        more = message.get("more_body", False)
    if len(whole) > limit:
        raise too_large(limit)
    return bytes(whole)


async def until_disconnect(receive: Receive) -> None:
    """Returns once the client has gone; only for after its body was read (uvicorn then answers
    every receive() with the disconnect, or when the response is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass
