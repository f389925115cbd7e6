"""The router's client for its workers (services/router/upstream.py) against real servers: raw
asyncio ones scripted byte by byte, and aiohttp. Keep-alive reuse, the one resend on a stale
connection (and no other), timeouts, bounded heads and buffers, bodies of every framing, the
connection bound."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from services.router.upstream import HEAD_MAX_BYTES, HIGH_WATER, Upstream, UpstreamError
from tests.helpers import eventually

pytestmark = pytest.mark.integration
PATH = "/v1/chat/completions"
BODY = b'{"model": "m"}'
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


@dataclass
class Seen:
    """One request a scripted server read: its connection's number, head and body."""

    conn: int
    head: bytes
    body: bytes


@dataclass
class Server:
    url: str
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    state: dict[str, object] = field(default_factory=dict)


Script = Callable[[Server, int, int, asyncio.StreamWriter], Awaitable[bool]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[Server]:
    """A server reading requests one by one on each connection; `script(server, conn, nth,
    writer)` answers the nth request (0 first) of connection `conn`; False closes it."""
    server = Server("")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = server.connections
        server.connections += 1
        server.open_now += 1
        server.most_open = max(server.most_open, server.open_now)
        try:
            nth = 0
            while (request := await read_request(reader)) is not None:
                server.seen.append(Seen(conn, *request))
                if not await script(server, conn, nth, writer):
                    break
                nth += 1
        except ConnectionError:
            pass
        finally:
            server.open_now -= 1
            writer.close()

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    try:
        yield server
    finally:
        listening.close()


async def answer_ok(server: Server, conn: int, nth: int, writer: asyncio.StreamWriter) -> bool:
    writer.write(OK)
    return True


def client(**kw: float) -> Upstream:
    settings: dict[str, float] = {
        "connect_timeout_s": 2.0,
        "header_timeout_s": 5.0,
        "keepalive_s": 30.0,
        "max_connections": 100,
    }
    settings.update(kw)
    return Upstream(
        connect_timeout_s=settings["connect_timeout_s"],
        header_timeout_s=settings["header_timeout_s"],
        keepalive_s=settings["keepalive_s"],
        max_connections=int(settings["max_connections"]),
    )


async def post_whole(up: Upstream, url: str, rid: str | None = None) -> tuple[int, bytes]:
    resp = await up.post(url, PATH, BODY, rid)
    try:
        return resp.status, await resp.read(5.0)
    finally:
        resp.release()


async def test_one_connection_serves_one_request_after_another() -> None:
    async with scripted(answer_ok) as server:
        up = client()
        for _ in range(3):
            assert await post_whole(up, server.url, "rid-1") == (200, b"{}")
        assert [s.conn for s in server.seen] == [0, 0, 0]
        head = server.seen[0].head.decode()
        assert head.startswith(f"POST {PATH} HTTP/1.1\r\n")
        for line in ("x-request-id: rid-1", "content-type: application/json", "content-length: 14"):
            assert line in head.split("\r\n")
        assert server.seen[0].body == BODY
        up.close()


async def test_a_url_path_prefixes_the_request_path_and_host_names_the_worker() -> None:
    async with scripted(answer_ok) as server:
        up = client()
        resp = await up.post(server.url + "/pool/a/", PATH, BODY)
        resp.release()
        head = server.seen[0].head.decode()
        assert head.startswith(f"POST /pool/a{PATH} HTTP/1.1\r\n")
        assert f"host: {server.url.removeprefix('http://')}" in head.split("\r\n")
        assert "x-request-id" not in head
        up.close()


async def stale_second(server: Server, conn: int, nth: int, writer: asyncio.StreamWriter) -> bool:
    """Answers a connection's first request; closes it, silent, on its second (the worker that
    closed an idle connection as the request came)."""
    if nth > 0:
        return False
    writer.write(OK)
    return True


async def test_a_reused_connection_closed_before_any_byte_is_resent_once_on_a_new_one() -> None:
    async with scripted(stale_second) as server:
        up = client()
        resent: list[int] = []
        up.on_resend = lambda: resent.append(1)
        assert await post_whole(up, server.url) == (200, b"{}")
        assert await post_whole(up, server.url) == (200, b"{}")
        # the second went out on connection 0 (reused, closed silent), then on connection 1
        assert [s.conn for s in server.seen] == [0, 0, 1]
        assert up.resent == 1
        assert resent == [1]
        up.close()


async def test_a_new_connection_closed_before_any_byte_is_not_resent() -> None:
    async def silent(server: Server, conn: int, nth: int, writer: asyncio.StreamWriter) -> bool:
        return False

    async with scripted(silent) as server:
        up = client()
        with pytest.raises(UpstreamError, match="closed the connection early"):
            await up.post(server.url, PATH, BODY)
        assert len(server.seen) == 1
        assert up.resent == 0
        up.close()


async def test_a_reused_connection_that_sent_a_byte_is_not_resent() -> None:
    async def half(server: Server, conn: int, nth: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(OK if nth == 0 else b"HTTP/1.1 200")
        return nth == 0

    async with scripted(half) as server:
        up = client()
        assert await post_whole(up, server.url) == (200, b"{}")
        with pytest.raises(UpstreamError):
            await up.post(server.url, PATH, BODY)
        assert len(server.seen) == 2
        assert up.resent == 0
        up.close()


async def test_a_worker_silent_after_part_of_its_head_times_out() -> None:
    async def stall(server: Server, conn: int, nth: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: appl")
        await asyncio.Event().wait()
        return False

    async with scripted(stall) as server:
        up = client(header_timeout_s=0.2)
        with pytest.raises(UpstreamError, match="no answer head"):
            await up.post(server.url, PATH, BODY)
        await eventually(lambda: up.open == 0)  # the connection was closed
        up.close()


async def test_a_head_larger_than_the_bound_is_refused() -> None:
    async def huge(server: Server, conn: int, nth: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nx-filler: " + b"a" * (4 * HEAD_MAX_BYTES))
        await writer.drain()
        await asyncio.Event().wait()
        return False

    async with scripted(huge) as server:
        up = client()
        with pytest.raises(UpstreamError, match="head exceeds"):
            await up.post(server.url, PATH, BODY)
        up.close()


async def test_bodies_framed_by_length_by_chunks_and_by_close_are_read_whole() -> None:
    answers = {
        0: b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
        1: b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
        2: b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nhello",
    }

    async def framed(server: Server, conn: int, nth: int, writer: asyncio.StreamWriter) -> bool:
        kind = (len(server.seen) - 1) % len(answers)
        writer.write(answers[kind])
        return kind != 2  # no length: the body ends with the connection

    async with scripted(framed) as server:
        up = client()
        for _ in answers:
            assert await post_whole(up, server.url) == (200, b"hello")
        # length and chunked bodies left the connection reusable; a closed one was not reused
        assert [s.conn for s in server.seen] == [0, 0, 0]
        assert await post_whole(up, server.url) == (200, b"hello")
        assert server.seen[-1].conn == 1
        up.close()


async def test_a_refusal_s_status_and_headers_are_read() -> None:
    async def busy(server: Server, conn: int, nth: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 4\r\n\r\nbusy"
        )
        return True

    async with scripted(busy) as server:
        up = client()
        resp = await up.post(server.url, PATH, BODY)
        assert (resp.status, resp.retry_after, resp.content_type) == (429, "7", "text/plain")
        assert resp.content_length == 4
        assert await resp.read(1.0) == b"busy"
        resp.release()
        up.close()


async def test_an_interim_answer_is_skipped() -> None:
    async def hints(server: Server, conn: int, nth: int, writer: asyncio.StreamWriter) -> bool:
        head = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\ncontent-type: text/html\r\n\r\n"
        writer.write(head + b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        return True

    async with scripted(hints) as server:
        up = client()
        resp = await up.post(server.url, PATH, BODY)
        assert (resp.status, resp.content_type, await resp.read(1.0)) == (200, None, b"{}")
        resp.release()
        up.close()


async def test_a_worker_dying_mid_body_is_an_error_after_what_it_sent() -> None:
    async def dies(server: Server, conn: int, nth: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 40)
        await writer.drain()
        return False

    async with scripted(dies) as server:
        up = client()
        resp = await up.post(server.url, PATH, BODY)
        assert await resp.chunk() == b"x" * 40
        with pytest.raises(UpstreamError, match="closed the connection early"):
            await resp.chunk()
        resp.release()
        with pytest.raises(UpstreamError):
            await post_whole(up, server.url)  # a whole read fails the same way
        up.close()


async def test_a_silent_body_fails_a_whole_read() -> None:
    async def pauses(server: Server, conn: int, nth: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
        await asyncio.Event().wait()
        return False

    async with scripted(pauses) as server:
        up = client()
        resp = await up.post(server.url, PATH, BODY)
        with pytest.raises(UpstreamError, match=r"no body bytes for 0\.1s"):
            await resp.read(0.1)
        resp.release()
        await eventually(lambda: up.open == 0)
        up.close()


async def test_a_slow_reader_pauses_the_worker_and_buffers_a_bounded_amount() -> None:
    total = 16 << 20
    piece = b"y" * (64 << 10)

    async def floods(server: Server, conn: int, nth: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        for _ in range(total // len(piece)):
            writer.write(piece)
            server.state["blocked"] = True
            await writer.drain()
            server.state["blocked"] = False
        return True

    async with scripted(floods) as server:
        up = client()
        resp = await up.post(server.url, PATH, BODY)
        await eventually(lambda: resp.conn.paused and server.state.get("blocked"))
        assert resp.buffered <= HIGH_WATER + (1 << 20)  # past the mark by one socket read at most
        got = 0
        while chunk := await resp.chunk():
            got += len(chunk)
        assert got == total
        resp.release()
        assert up.pools[server.url].idle == [resp.conn]  # read to its end: kept
        up.close()


async def test_idle_connections_past_keepalive_are_closed() -> None:
    async with scripted(answer_ok) as server:
        up = client(keepalive_s=0.1)
        assert await post_whole(up, server.url) == (200, b"{}")
        assert up.open == 1
        await eventually(lambda: up.open == 0 and server.open_now == 0)
        assert not up.pools  # the worker's pool is forgotten with its last connection
        up.close()


async def test_the_connection_bound_holds_and_a_request_waits_for_room() -> None:
    release = asyncio.Event()

    async def held(server: Server, conn: int, nth: int, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        writer.write(OK)
        return True

    async with scripted(held) as server:
        up = client(max_connections=2, connect_timeout_s=0.3)
        first = [asyncio.create_task(post_whole(up, server.url)) for _ in range(2)]
        await eventually(lambda: len(server.seen) == 2)
        with pytest.raises(UpstreamError, match="cannot connect"):
            await up.post(server.url, PATH, BODY)  # no room within its connect timeout
        up.connect_timeout_s = 5.0
        third = asyncio.create_task(post_whole(up, server.url))
        release.set()
        assert [await t for t in (*first, third)] == [(200, b"{}")] * 3
        assert server.most_open == 2
        assert up.open <= 2
        up.close()


async def test_an_unreachable_worker_is_an_upstream_error() -> None:
    async with scripted(answer_ok) as server:
        url = server.url
    up = client()
    with pytest.raises(UpstreamError, match="cannot connect"):
        await up.post(url, PATH, BODY)
    assert up.open == 0
    up.close()


async def test_an_aiohttp_worker_streams_and_keeps_the_connection() -> None:
    peers: set[object] = set()

    async def chat(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport)
        assert request.headers["x-request-id"] == "r"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n in range(3):
            await resp.write(b"data: %d\n\n" % n)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post(PATH, chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        up = client()
        for _ in range(2):
            resp = await up.post(url, PATH, BODY, "r")
            assert (resp.status, resp.content_type) == (200, "text/event-stream")
            got = b""
            while chunk := await resp.chunk():
                got += chunk
            resp.release()
            assert got == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert len(peers) == 1
        assert up.open == 1
        up.close()
    finally:
        await runner.cleanup()
