"""Per-role NATS users: a worker credential cannot fake registry events or touch the KV bucket."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import codec
from schemas.base import Envelope
from schemas.registry import WorkerRecord, WorkerRegistered, WorkerStatus
from schemas.subjects import Subjects
from services.common import natsauth
from services.common.bus import Bus, Message
from services.common.natsd import NatsServer
from tests.helpers import eventually

pytestmark = pytest.mark.integration
PREFIX = "fleet"
PASSWORDS = {role: f"pw-{role}" for role in natsauth.ROLES}


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["up", "compose"])
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """up: the config `switchboard up` generates; compose: the committed deploy/nats.conf with
    the passwords in nats-server's environment, as docker-compose runs it."""
    if request.param == "up":
        config = tmp_path / "nats.conf"
        config.write_text(natsauth.render_config(PREFIX, PASSWORDS))
        server = NatsServer(tmp_path / "js", config_file=config)
    else:
        env = {natsauth.password_env(role): pw for role, pw in PASSWORDS.items()}
        server = NatsServer(tmp_path / "js", config_file=ROOT / "deploy" / "nats.conf", env=env)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


async def connect(url: str, role: str) -> tuple[Bus, list[Exception]]:
    bus = await Bus.connect(natsauth.url_for(url, role, PASSWORDS[role]), role)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    bus.on_error(on_error)
    return bus, errors


async def test_worker_cannot_fake_events_or_touch_kv(secured: str) -> None:
    subjects = Subjects.for_prefix(PREFIX)
    operator, _ = await connect(secured, "operator")
    registry, _ = await connect(secured, "registry")
    worker, worker_errors = await connect(secured, "worker")
    seen: list[bytes] = []

    async def on_event(msg: Message) -> None:
        seen.append(bytes(msg.data))

    await operator.subscribe(subjects.registry_events, cb=on_event)
    await operator.flush()
    ghost = WorkerRecord(
        id="ghost", url="http://ghost:1", models=("m",), status=WorkerStatus.READY, revision=1
    )
    fake = codec.encode(
        Envelope(
            source="registry", epoch=1, seq=1, sent_at=0.0, body=WorkerRegistered(worker=ghost)
        )
    )
    await worker.publish(subjects.registry_events, fake)
    await worker.flush()
    await eventually(lambda: any("permissions violation" in str(e).lower() for e in worker_errors))
    # the real registry may publish, and the operator sees only that
    await registry.publish(subjects.registry_events, b"from-registry")
    await eventually(lambda: seen == [b"from-registry"])
    # JetStream / KV: the registry's bucket works for the registry, not for a worker
    kv = await registry.key_value(subjects.kv_bucket("registry"))
    await kv.put("workers.x", b"real")
    worker_errors.clear()
    try:
        await asyncio.wait_for(worker.key_value(subjects.kv_bucket("registry"), create=False), 3)
    except Exception as exc:  # which error depends on nats-py's path; print it for the record
        print(f"worker opening the KV bucket: {exc!r}")
    else:
        raise AssertionError("a worker credential opened the registry's KV bucket")
    await worker.publish(f"$KV.{subjects.kv_bucket('registry')}.workers.x", b"wiped")
    await worker.flush()
    await eventually(lambda: any("permissions violation" in str(e).lower() for e in worker_errors))
    assert (await kv.get("workers.x")).value == b"real"
    # and only capacity may publish capacity views
    capacity, capacity_errors = await connect(secured, "capacity")
    await capacity.publish(subjects.registry_events, b"not-mine")
    await capacity.flush()
    await eventually(
        lambda: any("permissions violation" in str(e).lower() for e in capacity_errors)
    )
    assert seen == [b"from-registry"]
    for bus in (operator, registry, worker, capacity):
        await bus.close()


def test_rendered_config_names_every_role() -> None:
    text = natsauth.render_config("prod.fleet", PASSWORDS)
    for role in natsauth.ROLES:
        assert f'"user": "{role}"' in text
    worker = natsauth.permissions("worker", "prod.fleet")
    assert worker["publish"] == {"allow": ["prod.fleet.load.*", "prod.fleet.registry.cmd.*"]}
    assert natsauth.url_for("nats://h:4222", "worker", "p@ss/") == "nats://worker:p%40ss%2F@h:4222"
