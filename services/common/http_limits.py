"""Deadlines and a connection bound on uvicorn's HTTP protocol: slow clients cannot hold servers."""

from __future__ import annotations

import asyncio
import resource
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from schemas.codec import error_body
from services.common.config import ServiceConfig
from services.common.head_join import HeadJoin


@dataclass(frozen=True, kw_only=True)
class HttpLimits:
    # From accept, or from a keep-alive request's first byte, until its head is complete. Idle
    # keep-alive time before that first byte is uvicorn's timeout_keep_alive, not this.
    header_timeout_s: float = 10.0
    # The longest silence while a request body is being read.
    body_idle_timeout_s: float = 30.0
    # Open connections served (idle keep-alive ones count: each holds a descriptor); the next
    # ones get a 503.
    max_connections: int = 4096
    # A request head (request line and headers) larger than this gets a 431: httptools itself
    # parses heads of any size.
    max_head_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        numbers = (self.header_timeout_s, self.body_idle_timeout_s)
        if min(numbers) <= 0 or self.max_connections < 1 or self.max_head_bytes < 1024:
            raise ValueError(f"HTTP limits out of range: {self}")

    @classmethod
    def of(cls, cfg: ServiceConfig) -> HttpLimits:
        return cls(
            header_timeout_s=cfg.http_header_timeout_s,
            body_idle_timeout_s=cfg.http_body_idle_timeout_s,
            max_connections=cfg.http_max_connections,
            max_head_bytes=cfg.http_max_head_bytes,
        )


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft descriptor limit towards `wanted` (never above the hard limit).

    Each connection holds a descriptor, and the common soft default (1024) is below the connection
    bound plus what a router also holds (NATS, its upstream pool); the hard limit is usually far
    higher, and raising the soft one needs no privilege.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


# A client over the bound gets only a 503, so it gets little time to send the head that earns it:
# every such connection holds a descriptor, and they are the ones a flood brings.
OVER_BOUND_HEADER_TIMEOUT_S = 1.0

_HEAD_TOO_LARGE_BODY = error_body(
    "the request head (request line and headers) is too large",
    "invalid_request_error",
    "request_header_fields_too_large",
)
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s"
    % (len(_HEAD_TOO_LARGE_BODY), _HEAD_TOO_LARGE_BODY)
)

_BUSY_BODY = error_body(
    "the server has too many open connections; retry shortly",
    "service_unavailable_error",
    "too_many_connections",
)


async def _too_many_connections(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    """What a connection over the bound gets instead of the app (uvicorn's own is plain text)."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_BUSY_BODY)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _BUSY_BODY, "more_body": False})


class LimitedProtocol(HttpToolsProtocol):
    """httptools' protocol with one timer per connection, armed by what the connection awaits.

    uvicorn 0.54 has no such deadline (encode/uvicorn#157 is still open): it arms no timer on a
    new connection, and the first byte of a keep-alive request cancels the only one it has.
    Everything it writes goes through a HeadJoin, so a response's head and body leave together.
    """

    limits: ClassVar[HttpLimits]
    admitted: ClassVar[set[LimitedProtocol]]
    _out: HeadJoin  # the transport as this protocol and its cycles see it (connection_made)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # head: awaiting a request head; body: reading its body; busy: the app has the request
        self._phase: Literal["head", "body", "busy"] = "head"
        self._timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_tail = b""  # the last bytes seen, for a blank line split across chunks

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Set before any request is parsed, so each cycle (given self.transport) writes through it.
        self._out = HeadJoin(transport, self.loop)
        self.transport = cast(asyncio.Transport, self._out)
        if len(self.admitted) < self.limits.max_connections:
            self.admitted.add(self)
            self._arm(self.limits.header_timeout_s)
        else:  # read the head first so the client is listening when the 503 comes
            self.app = _too_many_connections
            self._arm(min(self.limits.header_timeout_s, OVER_BOUND_HEADER_TIMEOUT_S))

    def connection_lost(self, exc: Exception | None) -> None:
        self.admitted.discard(self)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "body":  # any byte of the body is progress
            self._arm(self.limits.body_idle_timeout_s)
        elif self._phase == "head" and self._timer is None:  # a keep-alive request begins
            self._arm(self.limits.header_timeout_s)
        if self._phase == "head" and self._head_too_large(data):
            self._disarm()
            self.transport.write(_HEAD_TOO_LARGE)
            self.transport.close()
            return
        super().data_received(data)

    def _head_too_large(self, data: bytes) -> bool:
        """Count this chunk's head bytes (up to the blank line; what follows is body)."""
        seen = self._head_tail + data
        end = seen.find(b"\r\n\r\n")
        self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._head_tail))
        self._head_tail = data[-3:]
        return self._head_bytes > self.limits.max_head_bytes

    def on_headers_complete(self) -> None:
        self._phase = "body"
        self._head_bytes, self._head_tail = 0, b""
        self._arm(self.limits.body_idle_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = "busy"
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # A pipelined request queued behind this response keeps the connection busy.
        idle = self._phase == "busy" and not self.pipeline
        self._out.next_is_head()
        super().on_response_complete()
        if idle:
            self._phase = "head"

    def _arm(self, delay_s: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay_s, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._phase == "body" and self._app_is_behind():
            self._arm(self.limits.body_idle_timeout_s)
        else:
            self.transport.close()

    def _app_is_behind(self) -> bool:
        """The client is silent because we asked it to wait, not because it stalled."""
        awaiting_continue = self.cycle is not None and self.cycle.waiting_for_100_continue
        return self.flow.read_paused or awaiting_continue


def protocol_class(limits: HttpLimits) -> type[LimitedProtocol]:
    """A protocol class for one server: its own limits and its own count of connections."""
    attrs: dict[str, object] = {"limits": limits, "admitted": set()}
    return type("LimitedProtocol", (LimitedProtocol,), attrs)
