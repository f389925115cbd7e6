"""Foundation against a real nats-server: bus, KV, embedded server, `switchboard tail` and `up`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from schemas import codec
from schemas.base import Envelope
from schemas.registry import WorkerRecord, WorkerRegistered, WorkerStatus
from schemas.subjects import Subjects
from services.cli.natsd import NatsServer
from services.common.bus import Bus, KeyWrongLastSequenceError, NoRespondersError, reply
from tests.helpers import eventually, free_port, free_port_range

pytestmark = pytest.mark.integration

REC = WorkerRecord(
    id="w1", url="http://h:1", models=("m1",), status=WorkerStatus.PENDING, revision=1
)


async def test_publish_subscribe_and_request_reply(bus: Bus, prefix: str) -> None:
    subjects = Subjects.for_prefix(prefix)
    got: list[bytes] = []

    async def on_msg(msg: object) -> None:
        got.append(bytes(msg.data))  # type: ignore[attr-defined]

    await bus.subscribe(subjects.registry_events, cb=on_msg)

    async def answer(msg: object) -> None:
        await reply(msg, b"pong")  # type: ignore[arg-type]

    await bus.subscribe(subjects.registry_snapshot, cb=answer)
    await bus.publish(subjects.registry_events, b"one")
    assert await bus.request(subjects.registry_snapshot, b"ping") == b"pong"
    await eventually(lambda: got == [b"one"])
    with pytest.raises(NoRespondersError):
        await bus.request(subjects.capacity_snapshot, b"?", timeout_s=1)


async def test_kv_create_is_atomic(bus: Bus, prefix: str) -> None:
    kv = await bus.key_value(Subjects.for_prefix(prefix).kv_bucket("test"))
    rev = await kv.create("url_x", b"w1")
    with pytest.raises(KeyWrongLastSequenceError):
        await kv.create("url_x", b"w2")
    await kv.update("url_x", b"w3", last=rev)
    entry = await kv.get("url_x")
    assert entry.value == b"w3"


def test_embedded_server_restarts_with_its_data(tmp_path: Path) -> None:
    port = free_port()
    server = NatsServer(tmp_path / "js", port=port)
    assert server.start() == f"nats://127.0.0.1:{port}"

    async def write_then_read(write: bool) -> bytes:
        bus = await Bus.connect(server.url, "t")
        try:
            kv = await bus.key_value("durable")
            if write:
                await kv.put("k", b"survives")
            entry = await kv.get("k")
            return bytes(entry.value or b"")
        finally:
            await bus.close()

    assert asyncio.run(write_then_read(True)) == b"survives"
    server.stop()
    assert not server.running()
    server.start()
    try:
        assert asyncio.run(write_then_read(False)) == b"survives"
    finally:
        server.stop()


def _switchboard(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli.main", *args]


async def _read_until(
    stream: asyncio.StreamReader, needle: str, lines: list[str], timeout_s: float
) -> None:
    async def scan() -> None:
        while not any(needle in line for line in lines):
            raw = await stream.readline()
            if not raw:
                raise AssertionError(f"stream ended before {needle!r}; got {lines}")
            lines.append(raw.decode().rstrip("\n"))

    await asyncio.wait_for(scan(), timeout_s)


async def test_tail_shows_hand_published_messages_and_a_gap(
    bus: Bus, prefix: str, nats_url: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        *_switchboard("tail", "--nats-url", nats_url, "--prefix", prefix),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    subject = Subjects.for_prefix(prefix).registry_events
    lines: list[str] = []
    try:
        # tail subscribes asynchronously: publish until the first message shows up.
        async def first_seen() -> bool:
            env = Envelope(
                source="registry", epoch=1, seq=1, sent_at=0.0, body=WorkerRegistered(worker=REC)
            )
            await bus.publish(subject, codec.encode(env))
            try:
                await _read_until(proc.stdout, "#1 worker.registered", lines, 0.3)  # type: ignore[arg-type]
            except TimeoutError:
                return False
            return True

        await eventually(first_seen, timeout_s=15)
        for seq in (2, 4):  # seq 3 deliberately skipped
            env = Envelope(
                source="registry", epoch=1, seq=seq, sent_at=0.0, body=WorkerRegistered(worker=REC)
            )
            await bus.publish(subject, codec.encode(env))
        await _read_until(proc.stdout, "#4 worker.registered", lines, 10)
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 10)
    text = "\n".join(lines)
    assert "#2 worker.registered id=w1" in text
    assert f"--- GAP on {subject} from registry: expected #3, got #4 (1 lost)" in text
    assert proc.returncode == 0


async def test_up_starts_the_stack_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    worker_port = free_port_range(2)
    router_port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *_switchboard(
            "up",
            "--nats-port",
            str(port),
            "--state-dir",
            str(tmp_path / "sb"),
            "--registry-port",
            str(free_port()),
            "--capacity-port",
            str(free_port()),
            "--worker-base-port",
            str(worker_port),
            "--engine",
            "sim",
            "--router-port",
            str(router_port),
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "NATS_URL"} | {"PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        await _read_until(proc.stdout, "stack is up", lines, 90)
        operator_url = (tmp_path / "sb" / "operator-url").read_text().strip()
        assert operator_url.startswith("nats://operator:")
        assert (tmp_path / "sb" / "operator-url").stat().st_mode & 0o077 == 0  # owner-only
        bus = await Bus.connect(operator_url, "probe")
        await bus.flush()
        await bus.close()
        body = {
            "model": "sim-model",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        }
        async with aiohttp.ClientSession() as s:
            for p in (worker_port, worker_port + 1, router_port):
                async with s.post(f"http://127.0.0.1:{p}/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                    assert (await r.json())["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGINT)
        await _read_until(proc.stdout, "up         | stopped", lines, 30)
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 0, "\n".join(lines)
    text = "\n".join(lines)
    assert "registry is healthy" in text
    assert "capacity is healthy" in text
    assert "worker-1 is healthy" in text
    assert "worker-2 is healthy" in text
    assert "router is healthy" in text
    assert f"OpenAI API at http://127.0.0.1:{router_port}/v1" in text
    assert "registry   | " in text  # the child's own log lines, prefixed
    assert (tmp_path / "sb" / "nats" / "jetstream").is_dir()


async def test_accepted_sockets_have_tcp_nodelay() -> None:
    """Without TCP_NODELAY every keep-alive response waits ~40 ms on the peer's delayed ACK."""
    import socket

    from services.common.http import bind

    seen: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    # the same path uvicorn takes with a pre-bound socket
    server = await asyncio.get_running_loop().create_server(Probe, sock=bind("127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    await eventually(lambda: seen)
    writer.close()
    server.close()
    await server.wait_closed()
    assert seen == [1]
