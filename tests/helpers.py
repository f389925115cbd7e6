"""Test helpers: wait for an outcome instead of sleeping; find free ports; POST and read back."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from schemas import codec
from schemas.registry import WorkerRecord, WorkerStatus
from services.common.bus import Bus


async def eventually(
    predicate: Callable[[], Any | Awaitable[Any]], timeout_s: float = 5.0, interval_s: float = 0.02
) -> Any:
    """Poll predicate until it returns something truthy; fail with its last value on timeout."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        result = predicate()
        value = await result if inspect.isawaitable(result) else result
        if value:
            return value
        last = value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last value: {last!r})")
        await asyncio.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(count: int) -> int:
    """A first port such that it and the next count - 1 are free right now."""
    while True:
        first = free_port()
        socks = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


async def delivered(publisher: Bus, subscriber: Bus) -> None:
    """Barrier: what `publisher` sent before this call has reached `subscriber`'s callbacks.

    The publisher's round trip (PING/PONG) returns once the server has routed every earlier
    message; the server then queues them to the subscriber's connection ahead of the PONG that
    answers the subscriber's round trip, and nats-py hands each to its subscription's callback
    task before it sees that PONG. So a callback that does not await (one that counts a bad
    message) has run when this returns; one that awaits may still be at it.
    """
    await publisher.flush()
    await subscriber.flush()


async def until_counted(
    publish: Callable[[], Awaitable[None]],
    count: Callable[[], float],
    barrier: Callable[[], Awaitable[None]],
) -> float:
    """Publish probes until count() moves; return its value once every probe sent is counted.

    nats-server may take a moment to route to a subscription another connection just made, so a
    message published right after a service starts can go nowhere; tests that count messages
    first wait for the subscription this way. `barrier` (usually `delivered(test bus, service
    bus)`) returns once the probes still in flight are counted.
    """
    start = count()

    async def moved() -> bool:
        await publish()
        return count() > start

    await eventually(moved)
    await barrier()
    return count()


def assert_error_envelope(body: Any, code: str, type_: str | None = None) -> None:
    """body is exactly the OpenAI error envelope, with this code (and type, when given)."""
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    if type_ is not None:
        assert body["error"]["type"] == type_


async def post(
    s: aiohttp.ClientSession, url: str, payload: Any, **kw: Any
) -> tuple[int, Any, dict[str, str]]:
    """POST JSON (or raw bytes); (status, the JSON body decoded or the raw bytes, headers)."""
    kwargs = {"data": payload} if isinstance(payload, bytes) else {"json": payload}
    async with s.post(url, **kwargs, **kw) as resp:
        data = await resp.read()
        parsed = codec.decode(data, Any) if data.startswith(b"{") else data
        return resp.status, parsed, dict(resp.headers)


async def queue_and_leave(url: str, payload: Any, n: int, queued: Callable[[], int]) -> None:
    """n clients POST, wait until `queued()` counts all n, then all disconnect."""
    async with aiohttp.ClientSession() as leavers:
        waiting = [asyncio.create_task(post(leavers, url, payload)) for _ in range(n)]
        await eventually(lambda: queued() == n)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    # the session is closed: every leaver's connection is gone


def pid_with_args(*args: str) -> int:
    """The one running process whose command line holds every one of args as a whole argument
    (a service by its module and port; nats-server by its flags and port)."""
    from pathlib import Path  # only this helper needs it

    wanted = [a.encode() for a in args]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:  # it exited while we looked
                continue
            if all(a in argv for a in wanted):
                found.append(int(entry.name))
    assert len(found) == 1, f"{len(found)} processes with {args} on their command line"
    return found[0]


def ready_record(wid: str, labels: dict[str, str] | None = None) -> WorkerRecord:
    """A Ready worker serving model "m" (the router's unit tables)."""
    return WorkerRecord(
        id=wid,
        url=f"http://{wid}:1",
        models=("m",),
        status=WorkerStatus.READY,
        revision=1,
        labels=labels or {},
    )
