"""Slow clients cannot hold an HttpServer: header deadline, body idle timeout, connection bound."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from schemas import codec
from services.common.http import HttpServer, bind
from services.common.http_limits import OVER_BOUND_HEADER_TIMEOUT_S, HttpLimits
from tests.helpers import assert_error_envelope, eventually

pytestmark = pytest.mark.integration

HEADER_S = 0.3
BODY_IDLE_S = 0.6  # unlike HEADER_S, so a cut's timing tells which timer made it
TICK_S = 0.05  # a slow client's pace: far inside both timeouts
GIVE_UP_S = 5.0  # a connection the server holds is never cut; the shared CI box may be slow
HEAD_FOREVER = b"GET /ping HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 10_000


class Probe:
    """A small app that tells the test what its handlers saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = 0
        self.disconnects = 0

    def app(self) -> Starlette:
        async def ping(_: Request) -> Response:
            return PlainTextResponse("pong")

        async def echo(request: Request) -> Response:
            try:
                body = await request.body()
            except ClientDisconnect:
                self.disconnects += 1
                return Response(status_code=400)
            return PlainTextResponse(str(len(body)))

        async def hold(request: Request) -> Response:
            await request.body()
            self.holding += 1
            await self.release.wait()
            return PlainTextResponse("held")

        async def late(request: Request) -> Response:  # reads the body only once released
            self.holding += 1
            await self.release.wait()
            return PlainTextResponse(str(len(await request.body())))

        routes = [
            Route("/ping", ping),
            Route("/echo", echo, methods=["POST"]),
            Route("/hold", hold),
            Route("/late", late, methods=["POST"]),
        ]
        return Starlette(routes=routes)


@contextlib.asynccontextmanager
async def serving(
    probe: Probe, max_connections: int = 100, header_timeout_s: float = HEADER_S
) -> AsyncIterator[str]:
    limits = HttpLimits(
        header_timeout_s=header_timeout_s,
        body_idle_timeout_s=BODY_IDLE_S,
        max_connections=max_connections,
    )
    # keep-alive far beyond the timeouts: a cut the test sees is never uvicorn's own timer
    server = HttpServer(probe.app(), bind("127.0.0.1", 0), keep_alive_s=60, limits=limits)
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started)
        yield f"http://127.0.0.1:{server.port}"
    finally:
        probe.release.set()
        server.stop()
        await task


@contextlib.asynccontextmanager
async def connection(url: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()


async def until_cut(reader: asyncio.StreamReader) -> bytes:
    """All the server sends until it closes the connection; fails if it keeps it open."""
    try:
        return await asyncio.wait_for(reader.read(), GIVE_UP_S)
    except ConnectionResetError:
        return b""


async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> float:
    """Send data a byte per tick, slowloris style; seconds until the server closed on us."""
    began = time.monotonic()
    for byte in data:
        writer.write(bytes([byte]))
        try:
            if await asyncio.wait_for(reader.read(1), TICK_S) == b"":
                return time.monotonic() - began
        except TimeoutError:  # still open: the tick passed
            pass
        except ConnectionResetError:
            return time.monotonic() - began
        assert time.monotonic() - began < GIVE_UP_S, "the server held a slowloris client"
    raise AssertionError("ran out of bytes before the server cut the connection")


async def fetch(s: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with s.get(url) as resp:
        return resp.status, await resp.text()


async def test_slowloris_is_cut_at_the_header_deadline_while_others_are_served() -> None:
    async with serving(Probe()) as url, connection(url) as (reader, writer):
        slow = asyncio.create_task(trickle(reader, writer, HEAD_FOREVER))
        async with aiohttp.ClientSession() as s, s.get(url + "/ping") as resp:
            assert (resp.status, await resp.text()) == (200, "pong")
        assert not slow.done()  # served while the slow client was still trickling
        assert HEADER_S <= await slow < GIVE_UP_S


async def test_a_silent_connection_is_cut_at_the_header_deadline() -> None:
    async with serving(Probe()) as url, connection(url) as (reader, _):
        began = time.monotonic()
        assert await until_cut(reader) == b""
        assert time.monotonic() - began >= HEADER_S


async def test_keep_alive_waits_idle_but_a_slow_next_head_is_cut() -> None:
    async with serving(Probe()) as url, connection(url) as (reader, writer):
        writer.write(b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"pong"), GIVE_UP_S)
        # Idle between requests is keep-alive's business (60 s here), not the header deadline's.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 2 * HEADER_S)
        assert HEADER_S <= await trickle(reader, writer, HEAD_FOREVER) < GIVE_UP_S


async def test_a_truncated_body_is_cut_at_the_body_idle_timeout() -> None:
    probe = Probe()
    async with serving(probe) as url, connection(url) as (reader, writer):
        writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        began = time.monotonic()
        await until_cut(reader)
        assert time.monotonic() - began >= BODY_IDLE_S
        await eventually(lambda: probe.disconnects == 1)  # the handler was let go, too


async def test_a_stalled_chunked_body_is_cut() -> None:
    probe = Probe()
    async with serving(probe) as url, connection(url) as (reader, writer):
        head = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + b"5\r\nhello\r\na\r\n12345")  # the second chunk is 10 bytes: 5 sent
        began = time.monotonic()
        await until_cut(reader)
        assert time.monotonic() - began >= BODY_IDLE_S
        await eventually(lambda: probe.disconnects == 1)


async def test_a_slow_but_steady_body_is_read_to_the_end() -> None:
    async with serving(Probe()) as url, connection(url) as (reader, writer):
        body = b"x" * 16  # 16 ticks: longer than either timeout, never silent for long
        writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 16\r\n\r\n")
        began = time.monotonic()
        for byte in body[:-1]:
            writer.write(bytes([byte]))
            with pytest.raises(TimeoutError):  # nothing back, and still open, before the end
                await asyncio.wait_for(reader.read(1), TICK_S)
        assert time.monotonic() - began > BODY_IDLE_S
        writer.write(body[-1:])
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n16"), GIVE_UP_S)
        assert response.startswith(b"HTTP/1.1 200")


async def test_a_slow_app_is_not_cut() -> None:
    probe = Probe()
    async with serving(probe) as url, aiohttp.ClientSession() as s:
        held = asyncio.create_task(fetch(s, url + "/hold"))
        await eventually(lambda: probe.holding == 1)
        async with connection(url) as (reader, writer):  # a clock: it runs past both timeouts
            writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n")
            await until_cut(reader)
        probe.release.set()
        assert await held == (200, "held")


async def test_a_client_waiting_on_a_slow_reader_is_not_cut() -> None:
    probe = Probe()
    big = b"x" * 1_000_000  # past uvicorn's 64 KiB buffer: it stops reading, the client waits
    head = b"POST /late HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n"
    async with (
        serving(probe) as url,
        connection(url) as (reader, writer),
        connection(url) as (reader2, writer2),
    ):
        writer.write(head % len(big) + b"\r\n" + big)
        writer2.write(head % 2 + b"Expect: 100-continue\r\n\r\n")  # waits for "100 Continue"
        await eventually(lambda: probe.holding == 2)
        async with connection(url) as (clock, tick):  # runs past both timeouts
            tick.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n")
            await until_cut(clock)
        probe.release.set()
        await asyncio.wait_for(reader2.readuntil(b"100 Continue\r\n\r\n"), GIVE_UP_S)
        writer2.write(b"{}")
        response = await asyncio.wait_for(reader2.readuntil(b"\r\n\r\n2"), GIVE_UP_S)
        assert response.startswith(b"HTTP/1.1 200")
        expected = b"\r\n\r\n%d" % len(big)
        response = await asyncio.wait_for(reader.readuntil(expected), GIVE_UP_S)
        assert response.startswith(b"HTTP/1.1 200")


async def test_over_the_connection_bound_new_connections_get_a_fast_503() -> None:
    probe = Probe()
    # a header deadline past GIVE_UP_S: any cut seen here is the bound's own short one
    async with serving(probe, max_connections=2, header_timeout_s=2 * GIVE_UP_S) as url:
        async with aiohttp.ClientSession() as holders:
            held = [asyncio.create_task(fetch(holders, url + "/hold")) for _ in range(2)]
            await eventually(lambda: probe.holding == 2)
            began = time.monotonic()
            async with aiohttp.ClientSession() as s, s.get(url + "/ping") as resp:
                assert resp.status == 503
                assert time.monotonic() - began < 1.0  # answered at once, not left to time out
                assert (resp.headers["Retry-After"], resp.headers["Connection"]) == ("1", "close")
                body = codec.decode(await resp.read(), dict[str, object])
                assert_error_envelope(body, "too_many_connections", "service_unavailable_error")
            async with connection(url) as (reader, _):  # over the bound and silent: cut soon
                began = time.monotonic()
                assert await until_cut(reader) == b""
                assert time.monotonic() - began >= OVER_BOUND_HEADER_TIMEOUT_S
            probe.release.set()
            assert await asyncio.gather(*held) == [(200, "held")] * 2
        # the holders' connections closed with their session: the slots are free again

        async def served() -> bool:
            async with aiohttp.ClientSession() as s:
                return await fetch(s, url + "/ping") == (200, "pong")

        await eventually(served)


async def test_a_head_over_the_size_bound_gets_431_and_a_large_body_does_not() -> None:
    big = HttpLimits().max_head_bytes
    async with serving(Probe()) as url:
        async with connection(url) as (reader, writer):
            # sent at once, far faster than any deadline: only the size bound can refuse it
            writer.write(b"GET /ping HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * big + b"\r\n\r\n")
            answer = await until_cut(reader)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 ")
        assert_error_envelope(json.loads(body), "request_header_fields_too_large")
        async with aiohttp.ClientSession() as s:
            pad = {"x-pad": "a" * (big - 4096)}  # just under the bound: served
            async with s.get(url + "/ping", headers=pad) as resp:
                assert (resp.status, await resp.text()) == (200, "pong")
            # one chunk may hold a small head and much body: the body never counts as head
            async with s.post(url + "/echo", data=b"b" * (4 * big)) as resp:
                assert (resp.status, await resp.text()) == (200, str(4 * big))
