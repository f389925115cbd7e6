"""A worker's answer sent on as plain ASGI: whole (one body with its Content-Length) or streamed
chunk by chunk as it comes; each runs its `done` once its last byte is sent, however it ends.

Lean on purpose (docs/router.md, the hot path): Starlette's StreamingResponse opens a task group
and a cancel scope for every response; a stream here has one task (the disconnect watcher) and one
timer (the worker's silence), nothing per chunk but the chunk's own send.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from starlette.types import Receive, Scope, Send

from services.common.asgi import until_disconnect
from services.router.upstream import UpstreamError, WorkerResponse

Headers = list[tuple[bytes, bytes]]


class Answer(Protocol):
    """What the edge sends: a Starlette Response, a Reply or a Stream (its id header added)."""

    raw_headers: Headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...


class Reply:
    """A whole answer in two ASGI messages: Content-Length set, never chunked."""

    __slots__ = ("body", "done", "raw_headers", "status_code")

    def __init__(
        self, status: int, headers: Headers, body: bytes, done: Callable[[], Awaitable[None]]
    ) -> None:
        self.status_code, self.body, self.done = status, body, done
        self.raw_headers = [*headers, (b"content-length", b"%d" % len(body))]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            start = {"type": "http.response.start", "status": self.status_code}
            await send({**start, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.body})
        finally:
            await self.done()


class Stream:
    """A worker's answer relayed as it comes (chunked). A read error or `idle_s` of the worker's
    silence ends it early: `failed` says what to send last (an SSE error event, or nothing) and
    the status becomes 502 (for `done`: the client already has its 200)."""

    def __init__(
        self,
        resp: WorkerResponse,
        headers: Headers,
        *,
        idle_s: float,
        failed: Callable[[BaseException], bytes],
        done: Callable[[int], Awaitable[None]],
    ) -> None:
        self.resp, self.raw_headers, self.idle_s = resp, headers, idle_s
        self.failed, self.done = failed, done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = self.resp.status
        try:
            start = {"type": "http.response.start", "status": status}
            await send({**start, "headers": self.raw_headers})
            failure = await self._pump(receive, send)
            if failure is True:
                return  # its last chunk ended it
            last = b""
            if isinstance(failure, BaseException):
                status = 502
                last = self.failed(failure)
            # One message, so one write: the error event (if any) and the end of the body.
            await send({"type": "http.response.body", "body": last})
        finally:
            self.resp.release()  # an unfinished answer's connection is closed: the worker stops
            await self.done(status)

    async def _pump(self, receive: Receive, send: Send) -> BaseException | bool | None:
        """Chunks until the end; the failure that cut it short, else None (also when the client
        left: nobody is there to tell), or True when the last chunk was sent as the end (the
        worker's answer was whole with it: chunk and end go in one write)."""
        resp = self.resp
        watch = _Watch(receive, self.idle_s)
        try:
            while True:
                watch.reading_since = watch.loop.time()
                chunk = await resp.chunk()
                watch.reading_since = None
                if not chunk:
                    return None
                if resp.complete and not resp.body:
                    await send({"type": "http.response.body", "body": chunk})
                    return True
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except asyncio.CancelledError:
            # Ours (the watch's) unless someone else cancelled too: then it goes on up.
            if watch.why is None or watch.task.uncancel() > 0:
                raise
            return watch.why if isinstance(watch.why, BaseException) else None
        except UpstreamError as exc:
            return exc
        finally:
            watch.close()


class _Watch:
    """Cancels the relaying task when the client leaves (`why` "gone") or the worker has been
    silent for idle_s while it is read (`why` a TimeoutError): one task, one timer."""

    def __init__(self, receive: Receive, idle_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task, self.loop, self.idle_s = task, asyncio.get_running_loop(), idle_s
        self.why: BaseException | str | None = None
        self.reading_since: float | None = None  # None while a chunk is being sent
        self.timer = self.loop.call_later(idle_s, self._check)
        self.listener = self.loop.create_task(until_disconnect(receive))
        self.listener.add_done_callback(self._left)

    def _check(self) -> None:
        now = self.loop.time()
        since = now if self.reading_since is None else self.reading_since
        if now - since >= self.idle_s:
            self._stop(TimeoutError(f"the worker sent nothing for {self.idle_s:g}s"))
        else:
            self.timer = self.loop.call_at(since + self.idle_s, self._check)

    def _left(self, listener: asyncio.Task[None]) -> None:
        if not listener.cancelled():
            self._stop("gone")

    def _stop(self, why: BaseException | str) -> None:
        if self.why is None:
            self.why = why
            self.task.cancel()

    def close(self) -> None:
        """No more cancels from here on (the relay is past its loop)."""
        self.why = self.why or "closed"
        self.timer.cancel()
        self.listener.cancel()
