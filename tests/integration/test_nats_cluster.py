"""On a 3-node NATS cluster (real nats-servers, JetStream clustered): the registry keeps its records
in an R3 KV bucket, and losing the node it is connected to loses no worker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.registry import CommandOk, RegisterRequest, WorkerSpec
from schemas.subjects import Subjects
from services.cli.natsd import NatsServer
from services.common.bus import Bus, NoRespondersError, RequestTimeout, servers
from services.registry.client import RegistryClient
from tests.helpers import eventually, free_port
from tests.integration.registry_fixtures import running_registry

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    routes = [free_port() for _ in range(3)]
    nodes = [
        NatsServer(
            tmp_path / f"n{i}",
            port=free_port(),
            extra_args=(
                "--name",
                f"n{i}",
                "--cluster_name",
                "switchboard-test",
                "--cluster",
                f"nats://127.0.0.1:{routes[i]}",
                "--routes",
                ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(routes) if j != i),
            ),
        )
        for i in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                node.stop()


def test_servers_splits_a_cluster_url() -> None:
    assert servers("nats://a:4222, nats://b:4222,") == ["nats://a:4222", "nats://b:4222"]
    with pytest.raises(ValueError, match="no NATS server"):
        servers(" , ")


async def test_registry_on_r3_kv_survives_losing_its_node(cluster: list[NatsServer]) -> None:
    url = ",".join(node.url for node in cluster)
    prefix = "cluster"
    subjects = Subjects.for_prefix(prefix)
    async with running_registry(url, prefix, kv_replicas=3) as reg:
        kv = reg.service.store.kv
        status = await kv.status()
        assert status.stream_info.config.num_replicas == 3
        bus = await Bus.connect(url, "test-client")
        try:
            client = RegistryClient(bus, subjects)
            first = await client.call(
                RegisterRequest(worker=WorkerSpec(url="http://10.0.0.1:8000", models=("m",)))
            )
            assert isinstance(first, CommandOk)

            # Stop the node the registry talks to; it reconnects to another, the data is there.
            connected = reg.service.bus.nc.connected_url
            assert connected is not None
            victim = next(n for n in cluster if n.port == connected.port)
            victim.stop()

            async def registers_again() -> bool:
                try:
                    reply = await client.call(
                        RegisterRequest(
                            worker=WorkerSpec(url="http://10.0.0.2:8000", models=("m",))
                        )
                    )
                except (RequestTimeout, NoRespondersError):  # mid-failover
                    return False
                return isinstance(reply, CommandOk) or reply.code == "conflict"

            await eventually(registers_again, timeout_s=30, interval_s=0.5)
            snapshot = await client.snapshot()
            assert sorted(w.url for w in snapshot.workers) == [
                "http://10.0.0.1:8000",
                "http://10.0.0.2:8000",
            ]
        finally:
            await bus.close()
