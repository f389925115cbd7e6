"""Register fixed-response backends with a Switchboard registry as Ready, heartbeats off.

Run: python -m bench.router_register NATS_URL PREFIX URL... (from the source tree whose registry
runs: bench/router.py copies this file into a `--baseline` tree, so both speak the same schemas).
"""

from __future__ import annotations

import asyncio
import sys


async def register(nats_url: str, prefix: str, urls: list[str]) -> None:
    from schemas.registry import SetStatusRequest, UpsertRequest, WorkerSpec, WorkerStatus
    from schemas.subjects import Subjects
    from services.common.bus import Bus
    from services.registry.client import RegistryClient
    from services.registry.core import HEARTBEAT_LABEL

    bus = await Bus.connect(nats_url, "bench")
    try:
        client = RegistryClient(bus, Subjects.for_prefix(prefix), timeout_s=30)
        for url in urls:
            # The backends do not heartbeat: hand-managed external servers.
            spec = WorkerSpec(
                url=url, models=("m",), max_running_requests=4096, labels={HEARTBEAT_LABEL: "off"}
            )
            reply = await client.call(UpsertRequest(worker=spec))
            worker_id = reply.worker.id  # type: ignore[union-attr]
            await client.call(SetStatusRequest(id=worker_id, status=WorkerStatus.READY))
    finally:
        await bus.close()


if __name__ == "__main__":
    asyncio.run(register(sys.argv[1], sys.argv[2], sys.argv[3:]))
