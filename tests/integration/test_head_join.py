"""One write per whole response, on the services' own uvicorn protocol, counted at the real
transport, on both event loops; streams still go out event by event.

These fail if uvicorn changes how it writes (uvicorn is pinned; its httptools cycle writes a head on
`http.response.start` and each body on `http.response.body`, through the protocol's transport).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvicorn
import uvloop
from starlette.types import Receive, Scope, Send

from services.common.head_join import JOIN_LIMIT, HeadJoin
from services.common.http import bind
from services.common.http_limits import HttpLimits, protocol_class
from services.common.request_id import RequestIds

pytestmark = pytest.mark.integration

Scenario = Callable[[], Awaitable[None]]
LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
WAIT_S = 5.0  # a generous bound on any one read; the shared CI box may be slow


class Counted:
    """A real transport that records each write that reaches it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport, self.writes = transport, list[bytes]()

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class Gates:
    """What the test app waits on, and every connection's counted transport."""

    def __init__(self) -> None:
        self.first, self.second = asyncio.Event(), asyncio.Event()
        self.counted: list[Counted] = []

    def writes(self) -> list[bytes]:
        (only,) = self.counted  # each test speaks on one connection
        return only.writes


def app(gates: Gates) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """/json: a whole body, as every JSON answer; /stream: two chunks, each sent only once the
    test opens its gate; anything else: 404 with a whole body."""

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await gates.first.wait()
            await send({"type": "http.response.body", "body": b"one", "more_body": True})
            await gates.second.wait()
            await send({"type": "http.response.body", "body": b"two"})
            return
        status, body = (200, b'{"ok":true}') if scope["path"] == "/json" else (404, b"{}")
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return RequestIds(answer)  # as the services: its send wrapper between the app and uvicorn


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:  # the test's process keeps its own signal handlers
        yield


@contextlib.asynccontextmanager
async def serving(gates: Gates) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """The services' protocol (as HttpServer configures uvicorn), its transports counted; and a
    connection to it."""

    class Counting(protocol_class(HttpLimits())):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            counted = Counted(transport)
            gates.counted.append(counted)
            super().connection_made(counted)

    config = uvicorn.Config(
        app(gates), http=Counting, ws="none", log_config=None, access_log=False, lifespan="off"
    )
    server, sock = _Server(config), bind("127.0.0.1", 0)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes only a flag
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        try:
            yield reader, writer
        finally:
            writer.close()
    finally:
        gates.first.set()
        gates.second.set()
        server.should_exit = True
        await task


async def response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One whole response with a Content-Length: its head and its body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await asyncio.wait_for(reader.readexactly(length), WAIT_S)


def get(path: str, *extra: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path.encode(), b"".join(extra))


async def whole_responses_leave_in_one_write_each() -> None:
    gates = Gates()
    async with serving(gates) as (reader, writer):
        for n in range(1, 4):  # keep-alive: each response's head is held anew
            writer.write(get("/json"))
            head, body = await response(reader)
            assert (head[:12], body) == (b"HTTP/1.1 200", b'{"ok":true}')
            assert len(gates.writes()) == n
            assert gates.writes()[-1] == head + body
        writer.write(get("/json") + get("/nowhere"))  # pipelined: answered in order
        assert (await response(reader))[0][:12] == b"HTTP/1.1 200"
        assert (await response(reader))[0][:12] == b"HTTP/1.1 404"
        assert len(gates.writes()) == 5
        writer.write(get("/json", b"Connection: close\r\n"))
        assert (await response(reader))[1] == b'{"ok":true}'
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""  # then closed
        assert len(gates.writes()) == 6


async def a_stream_goes_out_as_it_is_sent() -> None:
    gates = Gates()
    async with serving(gates) as (reader, writer):
        writer.write(get("/stream"))
        # the head comes while the app waits for its first chunk: it does not wait with it
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
        assert b"transfer-encoding: chunked" in head
        gates.first.set()
        assert await asyncio.wait_for(reader.readuntil(b"one\r\n"), WAIT_S) == b"3\r\none\r\n"
        gates.second.set()
        last = b"3\r\ntwo\r\n0\r\n\r\n"
        assert await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), WAIT_S) == last
        assert len(gates.writes()) == 3
        writer.write(get("/json"))  # after a stream the next head is held again
        await response(reader)
        assert len(gates.writes()) == 4


async def a_head_request_gets_its_head_alone() -> None:
    gates = Gates()
    async with serving(gates) as (reader, writer):
        writer.write(get("/json").replace(b"GET", b"HEAD"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-length: 11" in head
        writer.write(get("/json"))
        assert (await response(reader))[1] == b'{"ok":true}'
        assert len(gates.writes()) == 2


@LOOPS
@pytest.mark.parametrize(
    "scenario",
    [
        whole_responses_leave_in_one_write_each,
        a_stream_goes_out_as_it_is_sent,
        a_head_request_gets_its_head_alone,
    ],
)
def test_on_a_real_server(run: Callable[[Awaitable[None]], None], scenario: Scenario) -> None:
    run(scenario())


class Recorded:
    """A stand-in transport: what was written, and whether it is closing."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


async def test_a_large_body_is_not_copied_to_join_its_head() -> None:
    raw = Recorded()
    out = HeadJoin(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    big = b"b" * (JOIN_LIMIT + 1)
    out.write(b"head")
    out.write(big)
    assert raw.writes == [b"head", big]
    assert raw.writes[1] is big


async def test_closing_sends_the_held_head_first_and_a_lost_peer_gets_nothing() -> None:
    raw = Recorded()
    out = HeadJoin(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    out.write(b"head")
    out.close()
    assert (raw.writes, raw.closing) == ([b"head"], True)
    lost = Recorded()
    out = HeadJoin(lost, asyncio.get_running_loop())  # type: ignore[arg-type]
    out.write(b"head")
    lost.closing = True  # the peer went before the head could go
    await asyncio.sleep(0)  # the held head's own send comes around
    assert lost.writes == []
