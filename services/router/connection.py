"""One connection to a worker and the answer on it (upstream.py's pieces): an asyncio protocol
feeding httptools, the answer's head read to what the relay needs, its body buffered within
HIGH_WATER (reading paused past it) and handed on whole or as it comes."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools

if TYPE_CHECKING:
    from services.router.upstream import Pool

# An answer's head (status line and headers) larger than this is refused: httptools would
# gather a head of any size.
HEAD_MAX_BYTES = 64 << 10
# A streamed body is buffered up to HIGH_WATER bytes while the relay's client is slow; past it
# the worker's socket is not read (TCP pushes back) until the buffer is handed on.
HIGH_WATER = 256 << 10
_PARSE_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)


class UpstreamError(Exception):
    """The worker could not be reached or its connection failed: refused, reset, closed early,
    silent past a deadline, or sent something that is not an HTTP/1.1 answer."""


class Stale(UpstreamError):
    """A reused connection ended before any byte of the answer (the keep-alive race)."""


class WorkerResponse:
    """One request's answer on one connection: `status` and the headers the relay reads once
    post() returns it, then its body, whole (read) or as it comes (chunk). release() when done:
    a whole answer's connection goes back to its pool, anything else is closed."""

    __slots__ = (
        "body",
        "buffered",
        "chunked",
        "complete",
        "conn",
        "content_length",
        "content_type",
        "error",
        "head_done",
        "keep_alive",
        "parser",
        "received",
        "released",
        "retry_after",
        "status",
        "waiter",
        "whole",
    )

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.content_type: str | None = None
        self.content_length: int | None = None
        self.retry_after: str | None = None
        self.received = 0  # bytes of the answer so far, head included
        self.head_done = self.complete = self.keep_alive = self.chunked = False
        self.whole = self.released = False
        self.error: UpstreamError | None = None
        self.body: list[bytes] = []
        self.buffered = 0
        self.waiter: asyncio.Future[None] | None = None

    # httptools' callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value.decode("latin-1")
        elif name == b"content-length":
            self.content_length = int(value)  # llhttp has checked it is digits
        elif name == b"retry-after":
            self.retry_after = value.decode("latin-1")
        elif name == b"transfer-encoding":
            self.chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (103 Early Hints): the real one follows
            self.content_type = self.content_length = self.retry_after = None
            self.chunked = False
            return
        self.status, self.head_done = status, True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if not self.head_done:
            return
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.whole:
            self.conn.pause()
        self._wake()

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()
            self._wake()

    # the connection's events
    def feed(self, data: bytes) -> None:
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except _PARSE_ERRORS as exc:
            self.fail(UpstreamError(f"the worker's answer is not HTTP/1.1: {exc}"))
            return
        if not self.head_done and self.received > HEAD_MAX_BYTES:
            self.fail(UpstreamError(f"the worker's answer head exceeds {HEAD_MAX_BYTES} bytes"))

    def lost(self, exc: Exception | None) -> None:
        """The connection ended. Without a length the body ran until now, so it is whole."""
        if self.complete:
            return
        if self.head_done and self.content_length is None and not self.chunked:
            self.complete = True
            self._wake()
        elif self.received == 0 and self.conn.served:
            self.fail(Stale(f"the worker closed a kept-alive connection: {exc!r}"))
        else:
            self.fail(UpstreamError(f"the worker closed the connection early: {exc!r}"))

    def fail(self, error: UpstreamError) -> None:
        """The answer cannot go on: the first error stays, the connection is closed."""
        if self.error is None and not self.complete:
            self.error = error
            self._wake()
        self.conn.close()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self, timeout_s: float | None, what: str) -> None:
        """Until the next event on this answer, or `timeout_s` of none (then it fails)."""
        loop = self.conn.loop
        self.waiter = waiter = loop.create_future()
        timer = None
        if timeout_s is not None:
            message = f"the worker sent no {what} for {timeout_s:g}s"
            timer = loop.call_later(timeout_s, self.fail, UpstreamError(message))
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()

    # the forwarder's and the relay's side
    async def started(self, timeout_s: float) -> None:
        """Returns once the head is in; raises the connection's UpstreamError."""
        while not self.head_done and self.error is None:
            await self._wait(timeout_s, "answer head")
        if self.error is not None:
            raise self.error

    async def read(self, idle_s: float) -> bytes:
        """The whole body; an UpstreamError when the connection fails or the worker is silent
        for idle_s before its end."""
        self.whole = True
        self.conn.resume()
        while not self.complete:
            if self.error is not None:
                raise self.error
            await self._wait(idle_s, "body bytes")
        body = self.body
        return body[0] if len(body) == 1 else b"".join(body)

    async def chunk(self) -> bytes:
        """The body bytes that came since the last call, waiting for some; b"" at its end.
        No deadline here: the relay watches the worker's silence (relay.py)."""
        while not self.body:
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            await self._wait(None, "body bytes")
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        self.conn.resume()
        return data

    def release(self) -> None:
        """Done with the answer (once; again is a no-op)."""
        if self.released:
            return
        self.released = True
        conn = self.conn
        if self.complete and self.keep_alive and self.error is None:
            conn.pool.put(conn)
        else:  # an unfinished answer: closing its connection tells the worker to stop
            conn.close()


class Conn(asyncio.Protocol):
    """One connection to a worker: at most one request on it at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool, self.loop = pool, pool.upstream.loop
        self.transport: asyncio.Transport | None = None
        self.response: WorkerResponse | None = None
        self.served = 0  # answers completed on it: a reused connection has served one
        self.idle_since = 0.0
        self.closed = self.paused = self.counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.counted = True
        self.pool.open += 1
        self.pool.upstream.open += 1

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response.complete:  # bytes nobody asked for: not to be trusted
            self.close()
        else:
            response.feed(data)

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        if self.response is not None:
            self.response.lost(exc)

    def send(self, data: bytes) -> WorkerResponse:
        response = self.response = WorkerResponse(self)
        if self.closed or self.transport is None:  # closed between its connect and now
            response.fail(UpstreamError("the worker closed the connection at once"))
        else:
            self.transport.write(data)
        return response

    def pause(self) -> None:
        if not self.paused and not self.closed and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if not self.closed and self.transport is not None:
                self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self.pool.lost(self)
