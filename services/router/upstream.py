"""The router's HTTP/1.1 client for its workers: keep-alive connections per worker URL on asyncio
protocols, answers parsed by httptools. Lean on purpose (docs/router.md, the hot path): a request
is one pooled connection taken, one write, the answer's head read to the fields the relay needs,
its body handed on as it comes, the connection put back.

The resend rule. A request goes out again, once and on a new connection, only when it was written
on a reused keep-alive connection and that connection ended (EOF or reset) before one byte of the
answer came back: the worker closing an idle connection just as the request was written, the
keep-alive race. Browsers resend then, POST included. The same silence also follows a worker that
read the request and died before answering; a new connection to it then fails, and the forwarder
treats that, like every other UpstreamError before the answer's first byte, as it always has (a
retry elsewhere). A first use of a connection, a timeout, or any byte received is never resent.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

from services.router.connection import (
    HEAD_MAX_BYTES,
    HIGH_WATER,
    Conn,
    Stale,
    UpstreamError,
    WorkerResponse,
)

__all__ = ["HEAD_MAX_BYTES", "HIGH_WATER", "Pool", "Upstream", "UpstreamError", "WorkerResponse"]


class Pool:
    """The connections to one worker URL: idle ones reused newest first, for at most keepalive_s
    (shorter than the worker's own keep-alive, so the worker rarely closes one first)."""

    def __init__(self, upstream: Upstream, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"not an http(s) URL: {url!r}")
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
            raise UpstreamError(f"a worker URL with control characters: {url!r}")
        self.upstream, self.url = upstream, url
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        netloc = parts.netloc.rpartition("@")[2]
        self.prefix = parts.path.rstrip("/").encode("latin-1")
        self.host_line = b" HTTP/1.1\r\nhost: " + netloc.encode("idna") + b"\r\n"
        self.open = 0  # its connections not yet closed, idle or in use
        self.starts: dict[str, bytes] = {}
        self.idle: list[Conn] = []  # oldest first

    def request(self, path: str, body: bytes, request_id: str | None) -> bytes:
        """The request's bytes, head and body: one write."""
        start = self.starts.get(path)
        if start is None:
            start = b"POST " + self.prefix + path.encode("latin-1") + self.host_line
            start += b"content-type: application/json\r\ncontent-length: "
            if len(self.starts) < 16:  # the completion paths, a fixed few
                self.starts[path] = start
        rid = b"" if request_id is None else b"x-request-id: " + request_id.encode() + b"\r\n"
        return b"%b%d\r\n%b\r\n%b" % (start, len(body), rid, body)

    def take(self, now: float) -> Conn | None:
        """The newest idle connection still young enough, else None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since < self.upstream.keepalive_s:
                return conn
            conn.close()
            for old in idle[:]:  # older still
                old.close()
        return None

    def put(self, conn: Conn) -> None:
        """A connection whose answer was read to its end, kept for the next request."""
        conn.response = None
        conn.served += 1
        conn.resume()
        upstream = self.upstream
        if conn.closed or upstream.pools.get(self.url) is not self or upstream.closed:
            conn.close()
            return
        if len(self.idle) >= upstream.max_idle_per_worker:
            conn.close()
            return
        conn.idle_since = upstream.loop.time()
        self.idle.append(conn)
        upstream.arm_sweep()
        upstream.room_freed()

    def lost(self, conn: Conn) -> None:
        """`conn` is closed: it leaves the idle list and the count of open connections."""
        if conn.counted:
            conn.counted = False
            self.open -= 1
            self.upstream.open -= 1
            self.upstream.room_freed()
        if conn.response is None and conn in self.idle:
            self.idle.remove(conn)

    def expire(self, before: float) -> None:
        idle = self.idle
        while idle and idle[0].idle_since < before:
            idle.pop(0).close()


class Upstream:
    """The client: a pool per worker URL, at most max_connections open in all (a request that
    would open one more waits for one to close, within its connect timeout)."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        header_timeout_s: float,
        keepalive_s: float,
        max_connections: int,
        max_idle_per_worker: int = 256,
        on_resend: Callable[[], None] | None = None,
    ) -> None:
        """on_resend: called each time a request is resent on a new connection (the rule in
        this module's docstring)."""
        self.loop = asyncio.get_running_loop()
        self.connect_timeout_s, self.header_timeout_s = connect_timeout_s, header_timeout_s
        self.keepalive_s, self.max_connections = keepalive_s, max_connections
        self.max_idle_per_worker = max_idle_per_worker
        self.on_resend = on_resend
        self.pools: dict[str, Pool] = {}
        self.open = 0  # connected and not yet closed
        self.connecting = 0
        self.resent = 0
        self.closed = False
        self._sweep: asyncio.TimerHandle | None = None
        self._room: collections.deque[asyncio.Future[None]] = collections.deque()
        self._tls: ssl.SSLContext | None = None

    async def post(
        self, url: str, path: str, body: bytes, request_id: str | None = None
    ) -> WorkerResponse:
        """POST `body` (JSON) to url + path; the answer once its head is in. Raises
        UpstreamError when the worker cannot be reached or fails before its head."""
        pool = self.pools.get(url)
        if pool is None:
            pool = self.pools[url] = Pool(self, url)
        data = pool.request(path, body, request_id)
        conn = pool.take(self.loop.time())
        if conn is not None:
            try:
                return await self._exchange(conn, data)
            except Stale:
                self.resent += 1
                if self.on_resend is not None:
                    self.on_resend()
        return await self._exchange(await self._connect(pool), data)

    async def _exchange(self, conn: Conn, data: bytes) -> WorkerResponse:
        response = conn.send(data)
        try:
            await response.started(self.header_timeout_s)
        except BaseException:
            response.release()  # unfinished: closed
            raise
        return response

    async def _connect(self, pool: Pool) -> Conn:
        self.connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await self._room_for_one()
                if pool.tls:
                    _, conn = await self.loop.create_connection(
                        lambda: Conn(pool),
                        pool.host,
                        pool.port,
                        ssl=self._tls_context(),
                        server_hostname=pool.host,
                    )
                else:
                    _, conn = await self.loop.create_connection(
                        lambda: Conn(pool), pool.host, pool.port
                    )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {pool.url}: {exc!r}") from exc
        finally:
            self.connecting -= 1
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small writes go now
        return conn

    async def _room_for_one(self) -> None:
        """Waits while max_connections are open or opening, closing an idle one if any."""
        while self.open + self.connecting > self.max_connections:
            oldest = min(
                (p.idle[0] for p in self.pools.values() if p.idle),
                key=lambda c: c.idle_since,
                default=None,
            )
            if oldest is not None:
                oldest.close()
                continue
            waiter = self.loop.create_future()
            self._room.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._room:
                    self._room.remove(waiter)

    def room_freed(self) -> None:
        while self._room:
            waiter = self._room.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def arm_sweep(self) -> None:
        if self._sweep is None:
            self._sweep = self.loop.call_later(self.keepalive_s, self.sweep)

    def sweep(self) -> None:
        """Closes connections idle past keepalive_s and forgets pools left empty (workers come
        and go: their URLs must not pile up)."""
        self._sweep = None
        before = self.loop.time() - self.keepalive_s
        for url, pool in list(self.pools.items()):
            pool.expire(before)
            if pool.open == 0:
                del self.pools[url]
        if self.pools:
            self.arm_sweep()

    def close(self) -> None:
        """Closes every idle connection; those in use close as their answers are released."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for pool in self.pools.values():
            for conn in pool.idle[:]:
                conn.close()
        self.pools.clear()
