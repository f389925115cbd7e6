"""The one line a failed first connect to NATS turns into: which NATS, from where, why; and the
in-memory bus (tests/memory_bus.py) against a real nats-server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import nats.errors
import pytest

from services.common.bus import (
    Bus,
    Message,
    NoRespondersError,
    RequestTimeout,
    connect_failure,
    mask_url,
    reply,
)
from tests.helpers import eventually
from tests.memory_bus import MemoryBus
from tests.unit.test_memory_bus import MATCHES


def test_mask_url_hides_every_password_and_token() -> None:
    assert mask_url("nats://op:s3cret@h:4222") == "nats://op:***@h:4222"
    assert mask_url("nats://t0ken@h:4222") == "nats://***@h:4222"
    assert mask_url("nats://a:x@h1:1,nats://a:y@h2:2") == "nats://a:***@h1:1,nats://a:***@h2:2"
    assert mask_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_connect_failure_names_the_cause() -> None:
    url = "nats://op:s3cret@127.0.0.1:4222"
    source = "credentials from .switchboard/operator-url"
    refused = ConnectionRefusedError(111, "Connect call failed")
    assert connect_failure(url, source, 5, [refused]) == (
        "cannot reach NATS at nats://op:***@127.0.0.1:4222 "
        "(credentials from .switchboard/operator-url): connection refused"
    )
    auth = nats.errors.Error("nats: 'Authorization Violation'")
    reset = ConnectionResetError(104, "Connection reset by peer")
    # The server hangs up after refusing; the refusal is the news.
    assert connect_failure(url, "", 5, [auth, reset]).endswith(
        "127.0.0.1:4222: authorization violation (wrong user or password)"
    )
    assert connect_failure(url, "", 2.5, []).endswith(": no connection within 2.5s")
    assert connect_failure(url, "", 5, [TimeoutError()]).endswith(
        ": no answer within 5s (is it a NATS server?)"
    )


async def exchange(bus: Bus, prefix: str) -> tuple[frozenset[tuple[str, str]], bytes, str]:
    """Subscribe every pattern of MATCHES, publish every subject once, make one request that is
    answered and one nobody hears: what reached which pattern, the answer, the unheard's end."""
    got: set[tuple[str, str]] = set()

    def recorder(pattern: str) -> Callable[[Message], Awaitable[None]]:
        async def on_msg(msg: Message) -> None:
            got.add((pattern, msg.subject.removeprefix(f"{prefix}.")))

        return on_msg

    async def echo(msg: Message) -> None:
        await reply(msg, b"re: " + msg.data)

    for pattern in sorted({pattern for pattern, _, _ in MATCHES}):
        await bus.subscribe(f"{prefix}.{pattern}", cb=recorder(pattern))
    await bus.subscribe(f"{prefix}svc.echo", queue="svc", cb=echo)  # outside `prefix.>`
    await bus.flush()
    for subject in sorted({subject for _, subject, _ in MATCHES}):
        await bus.publish(f"{prefix}.{subject}", b"x")
    await eventually(lambda: got >= {(p, s) for p, s, delivered in MATCHES if delivered})
    await bus.flush()  # anything else would have arrived by now
    answer = await bus.request(f"{prefix}svc.echo", b"hi", timeout_s=2)
    try:
        await bus.request(f"{prefix}svc.nobody", b"", timeout_s=0.1)
        unheard = "answered"
    except NoRespondersError:
        unheard = "no responders"
    except RequestTimeout:
        unheard = "timeout"
    return frozenset(got), answer, unheard


@pytest.mark.integration
async def test_the_memory_bus_delivers_as_nats_server_does(bus: Bus, prefix: str) -> None:
    memory = MemoryBus()
    try:
        seen = await exchange(memory, prefix)
    finally:
        await memory.close()
    assert await exchange(bus, prefix) == seen
    delivered_to, answer, unheard = seen
    assert [(p, s) in delivered_to for p, s, _ in MATCHES] == [d for _, _, d in MATCHES]
    assert (answer, unheard) == (b"re: hi", "no responders")
