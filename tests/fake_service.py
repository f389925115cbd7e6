"""A stand-in service for supervisor tests: serves /healthz on the socket `up` hands it, logs.

`python -m tests.fake_service MODE [FILE]`, MODE one of: bigline (a 1 MB log line first, then
ticks), hang (blocks for good once FILE exists, deleting it, so its restart does not hang),
stubborn (ignores SIGTERM), drain (on SIGTERM: one line, exit 0), kv (as the registry: puts a
value in its KV bucket, and once FILE exists reads it back, over a connection that reconnects).
"""

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from nats.js.kv import KeyValue

from schemas.subjects import Subjects
from services.common.bus import Bus


async def healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    body = json.dumps({"ok": True, "instance": os.environ.get("SWITCHBOARD_INSTANCE")}).encode()
    head = (
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    writer.close()


def triggered(trigger: Path | None) -> bool:
    """The test created the file (taken away again: a restarted copy must not see it)."""
    if trigger is None or not trigger.exists():
        return False
    trigger.unlink()
    return True


def hang() -> None:
    print("hanging", flush=True)
    time.sleep(3600)  # the event loop stops: /healthz goes unanswered


async def open_kv() -> KeyValue:
    """As a service does: Bus reconnects forever after its first connection."""
    bus = await Bus.connect(os.environ["NATS_URL"], "keeper")
    return await bus.key_value(Subjects.for_prefix("fleet").kv_bucket("registry"))


async def main(mode: str, trigger: Path | None) -> None:
    stop = asyncio.Event()
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "drain":
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sock = socket.socket(fileno=int(os.environ["SWITCHBOARD_LISTEN_FD"]))
    server = await asyncio.start_server(healthz, sock=sock)
    print(f"pid {os.getpid()}", flush=True)
    if mode == "bigline":
        print("x" * 1_000_000, flush=True)
    kv = await open_kv() if mode == "kv" else None
    if kv is not None:
        await kv.put("survivor", b"written before")
        print("kv put", flush=True)
    tick = 0
    while not stop.is_set():
        tick += 1
        print(f"tick {tick}", flush=True)
        if kv is not None and triggered(trigger):
            try:
                print(f"kv got {(await kv.get('survivor')).value!r}", flush=True)
            except Exception as exc:  # not reconnected yet: the test asks again
                print(f"kv get failed: {exc!r}", flush=True)
        if mode == "hang" and triggered(trigger):
            hang()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)
    print("drained", flush=True)
    server.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) > 2 else None))
