"""`switchboard status` and `switchboard drain` against a real registry, capacity and worker."""

from __future__ import annotations

import asyncio
import sys

import pytest

from schemas.registry import WorkerStatus
from tests.helpers import eventually
from tests.integration.fleet_fixtures import running_capacity, running_worker
from tests.integration.registry_fixtures import running_registry

pytestmark = pytest.mark.integration


async def cli(nats_url: str, prefix: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli.main",
        *args,
        "--nats-url",
        nats_url,
        "--prefix",
        prefix,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, (out + err).decode()
    assert b"nats disconnected" not in err  # a clean close is not reported as trouble
    return out.decode()


async def test_status_and_drain(nats_url: str, prefix: str) -> None:
    async with (
        running_registry(nats_url, prefix) as reg,
        running_capacity(nats_url, prefix),
        running_worker(nats_url, prefix, sim_max_batch=4) as w,
    ):
        await eventually(
            lambda: reg.service.book.records[w.service.worker_id].status == WorkerStatus.READY
        )
        text = await cli(nats_url, prefix, "status")
        row = next(line for line in text.splitlines() if line.startswith(w.service.worker_id))
        assert row.split()[:6] == [w.service.worker_id, "ready", w.url, "sim-model", "0/4", "0/64"]
        assert "capacity: fleet 4 (worker_reported, 1 healthy)" in text
        drained = await cli(nats_url, prefix, "drain", w.service.worker_id)
        assert drained.startswith(f"{w.service.worker_id}: draining")
        await eventually(
            lambda: reg.service.book.records[w.service.worker_id].status == WorkerStatus.DRAINING
        )
        assert (await cli(nats_url, prefix, "drain", w.service.worker_id, "--undo")).startswith(
            f"{w.service.worker_id}: ready"
        )
