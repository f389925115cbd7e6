"""NATS users against a real nats-server running the generated config: a worker credential
cannot fake registry events or touch the KV bucket, speaks only for its own worker (its records,
its heartbeats), and reads only its own replies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import aiohttp
import msgspec
import pytest

from schemas import codec
from schemas.base import Envelope
from schemas.load import WorkerLoad
from schemas.registry import (
    CommandError,
    CommandOk,
    CommandReply,
    GetRequest,
    ListRequest,
    RegisterRequest,
    RemoveRequest,
    ReplaceRequest,
    SetStatusRequest,
    WorkerRecord,
    WorkerRegistered,
    WorkerSpec,
    WorkerStatus,
)
from schemas.subjects import Subjects
from services.cli import natsauth
from services.cli.natsd import NatsServer
from services.common.bus import Bus, Message, user_of
from services.common.seq import Sequencer
from services.registry.client import RegistryClient
from tests.helpers import eventually
from tests.integration.fleet_fixtures import running_router, running_worker
from tests.integration.registry_fixtures import running_registry

pytestmark = pytest.mark.integration
PREFIX = "fleet"
UP_WORKERS = ("worker-1", "worker-2")  # what `up` names them
USERS = (*natsauth.SERVICE_USERS, *UP_WORKERS, *natsauth.COMPOSE_USERS)
PASSWORDS = {user: f"pw-{user}" for user in USERS}
S = WorkerStatus
TOKEN = "admin-token"


ROOT = Path(__file__).resolve().parents[2]


class Secured(msgspec.Struct, frozen=True):
    url: str  # no credentials
    workers: tuple[str, str]  # two worker users (principals)

    def url_of(self, user: str) -> str:
        return natsauth.url_for(self.url, user, PASSWORDS[user])


@pytest.fixture(params=["up", "compose"])
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Secured]:
    """up: the config `switchboard up` generates (a user per worker); compose: the committed
    deploy/nats.conf with the passwords in nats-server's environment, as docker-compose runs it
    (a user per worker service)."""
    if request.param == "up":
        users = (*natsauth.SERVICE_USERS, *UP_WORKERS)
        config = tmp_path / "nats.conf"
        config.write_text(natsauth.render_config(PREFIX, {u: PASSWORDS[u] for u in users}))
        server = NatsServer(tmp_path / "js", config_file=config)
        workers = UP_WORKERS
    else:
        env = {natsauth.password_env(u): PASSWORDS[u] for u in natsauth.COMPOSE_USERS}
        server = NatsServer(tmp_path / "js", config_file=ROOT / "deploy" / "nats.conf", env=env)
        workers = ("worker", "worker-gpu")
    url = server.start()
    try:
        yield Secured(url, workers)
    finally:
        server.stop()


async def connect(secured: Secured, user: str) -> tuple[Bus, list[Exception]]:
    bus = await Bus.connect(secured.url_of(user), user)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    bus.on_error(on_error)
    return bus, errors


def violated(errors: list[Exception], subject: str = "") -> bool:
    """nats-server refused us (publish or subscribe to subject); nats-py lowercases its text."""
    return any(
        "permissions violation" in str(e).lower() and f'"{subject.lower()}' in str(e).lower()
        for e in errors
    )


async def test_worker_cannot_fake_events_or_touch_kv(secured: Secured) -> None:
    subjects = Subjects.for_prefix(PREFIX)
    operator, _ = await connect(secured, "operator")
    registry, _ = await connect(secured, "registry")
    worker, worker_errors = await connect(secured, secured.workers[0])
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
    await eventually(lambda: violated(worker_errors))
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
    await eventually(lambda: violated(worker_errors))
    assert (await kv.get("workers.x")).value == b"real"
    # and only capacity may publish capacity views
    capacity, capacity_errors = await connect(secured, "capacity")
    await capacity.publish(subjects.registry_events, b"not-mine")
    await capacity.flush()
    await eventually(lambda: violated(capacity_errors))
    assert seen == [b"from-registry"]
    for bus in (operator, registry, worker, capacity):
        await bus.close()


def test_rendered_config_names_every_user() -> None:
    text = natsauth.render_config("prod.fleet", PASSWORDS)
    for user in USERS:
        assert f'"user": "{user}"' in text
    worker = natsauth.permissions("worker", "prod.fleet", "worker-1")
    assert worker["publish"] == {
        "allow": [
            "prod.fleet.load.worker-1.*",
            "prod.fleet.kv.worker-1.*",
            "prod.fleet.registry.wcmd.worker-1.*",
        ]
    }
    assert worker["subscribe"] == {"allow": ["_INBOX_worker-1.>"]}
    assert natsauth.url_for("nats://h:4222", "worker", "p@ss/") == "nats://worker:p%40ss%2F@h:4222"
    assert user_of("nats://worker-1:p%40ss@h:4222,nats://h2:4222") == "worker-1"
    assert user_of("nats://a-token@h:4222") == ""  # a token names no user
    assert user_of("nats://h:4222") == ""
    assert natsauth.role_of("worker-gpu") == "worker"
    assert natsauth.role_of("router") == "router"


def ok(reply: CommandReply) -> WorkerRecord:
    assert isinstance(reply, CommandOk), reply
    assert reply.worker is not None
    return reply.worker


def forbidden(reply: CommandReply) -> None:
    assert isinstance(reply, CommandError), reply
    assert reply.code == "forbidden", reply


async def ready(client: RegistryClient, worker_id: str | None) -> bool:
    assert worker_id is not None
    reply = await client.call(GetRequest(id=worker_id))
    return (
        isinstance(reply, CommandOk) and reply.worker is not None and reply.worker.status == S.READY
    )


async def test_a_worker_changes_only_its_own_records(secured: Secured) -> None:
    a_user, b_user = secured.workers
    subjects = Subjects.for_prefix(PREFIX)
    operator_bus, _ = await connect(secured, "operator")
    attacker, errors = await connect(secured, a_user)
    operator = RegistryClient(operator_bus, subjects)
    as_a = RegistryClient(attacker, subjects, principal=a_user)
    evil = WorkerSpec(url="http://evil.example:8000", models=("sim-model",))
    async with (
        running_registry(secured.url_of("registry"), PREFIX),
        running_worker(secured.url_of(a_user), PREFIX) as a,
        running_worker(secured.url_of(b_user), PREFIX) as b,
    ):
        await eventually(lambda: ready(operator, b.service.worker_id))
        before = ok(await operator.call(GetRequest(id=b.service.worker_id)))
        assert before.owner == b_user
        assert ok(await operator.call(GetRequest(id=a.service.worker_id))).owner == a_user
        # through its own subjects, the registry refuses every change to B's record
        forbidden(await as_a.call(ReplaceRequest(id=b.service.worker_id, worker=evil)))
        forbidden(await as_a.call(SetStatusRequest(id=b.service.worker_id, status=S.FAILED)))
        forbidden(await as_a.call(RemoveRequest(id=b.service.worker_id)))
        forbidden(await as_a.call(GetRequest(id=b.service.worker_id)))
        forbidden(await as_a.call(ListRequest()))
        # and nats-server refuses the subjects of B and of operators
        for subject in (subjects.worker_cmd(b_user, "replace"), subjects.registry_cmd("replace")):
            await attacker.publish(
                subject, codec.encode(ReplaceRequest(id=b.service.worker_id, worker=evil))
            )
            await attacker.flush()
            await eventually(partial(violated, errors, subject))
        after = ok(await operator.call(GetRequest(id=b.service.worker_id)))
        assert (after.url, after.status, after.revision) == (before.url, S.READY, before.revision)
        # its own record it may read and change
        assert ok(await as_a.call(GetRequest(id=a.service.worker_id))).owner == a_user
    for bus in (operator_bus, attacker):
        await bus.close()


async def test_a_worker_cannot_heartbeat_for_another(secured: Secured) -> None:
    """Neither on the other's subject (nats-server refuses it) nor on its own with the other's
    id in the body (the registry and the router drop it)."""
    a_user, b_user = secured.workers
    subjects = Subjects.for_prefix(PREFIX)
    operator_bus, _ = await connect(secured, "operator")
    attacker, errors = await connect(secured, a_user)
    operator = RegistryClient(operator_bus, subjects)
    async with (
        running_registry(secured.url_of("registry"), PREFIX) as reg,
        running_router(secured.url_of("router"), PREFIX) as router,
        running_worker(secured.url_of(b_user), PREFIX) as b,
    ):
        await eventually(lambda: ready(operator, b.service.worker_id))
        # an operator's record nobody heartbeats: a lie that it is ready must not make it Ready
        held = ok(
            await operator.call(
                RegisterRequest(
                    worker=WorkerSpec(url="http://10.9.0.1:8000", models=("sim-model",))
                )
            )
        )
        await eventually(lambda: held.id in router.service.view.records)
        not_owner = {"subject": "load.not_owner"}

        def counted() -> list[float | None]:
            """Heartbeats refused because their sender does not own the record, per reader."""
            return [
                reg.service.metrics.prometheus.get_sample_value(
                    "switchboard_registry_messages_rejected_total", not_owner
                ),
                router.service.metrics.prometheus.get_sample_value(
                    "switchboard_router_messages_rejected_total", not_owner
                ),
            ]

        async def lie_about(victim: str) -> None:
            lie = Sequencer(a_user, epoch=1).stamp(
                WorkerLoad(
                    worker_id=victim,
                    url="http://x:1",
                    models=(),
                    status=S.READY,
                    heartbeat_interval_s=99.0,
                ),
                0.0,
            )
            await attacker.publish(subjects.load(b_user, victim), codec.encode(lie))
            await attacker.flush()
            await eventually(lambda: violated(errors, subjects.load(b_user, victim)))
            before = [n or 0.0 for n in counted()]
            await attacker.publish(subjects.load(a_user, victim), codec.encode(lie))
            await eventually(lambda: counted() == [n + 1 for n in before])
            beat = router.service.view.beats.get(victim)
            assert beat is None or beat.load.heartbeat_interval_s != 99.0

        assert b.service.worker_id is not None
        await lie_about(b.service.worker_id)
        await lie_about(held.id)
        # nor for another's prefix cache: nats-server refuses its block-event subject
        kv_of_b = subjects.kv(b_user, b.service.worker_id)
        await attacker.publish(kv_of_b, b"{}")
        await attacker.flush()
        await eventually(lambda: violated(errors, kv_of_b))
        assert ok(await operator.call(GetRequest(id=held.id))).status == S.PENDING
    for bus in (operator_bus, attacker):
        await bus.close()


async def test_a_credential_reads_only_its_own_replies(secured: Secured) -> None:
    a_user, b_user = secured.workers
    subjects = Subjects.for_prefix(PREFIX)
    operator_bus, _ = await connect(secured, "operator")
    attacker, errors = await connect(secured, a_user)
    seen: list[str] = []

    async def overheard(msg: Message) -> None:
        seen.append(msg.subject)

    async with (
        running_registry(secured.url_of("registry"), PREFIX),
        running_worker(secured.url_of(b_user), PREFIX) as b,
    ):
        operator = RegistryClient(operator_bus, subjects)
        await eventually(lambda: ready(operator, b.service.worker_id))
        for inbox in ("_INBOX.>", f"_INBOX_{b_user}.>", "_INBOX_operator.>", "_INBOX_registry.>"):
            await attacker.subscribe(inbox, cb=overheard)
            await attacker.flush()
            await eventually(partial(violated, errors, inbox))
        # replies flow to others: the registry snapshot to the operator, B's own to B
        assert (await operator.snapshot()).workers
        assert b.service.lifecycle is not None
        await b.service.lifecycle.check()
        await attacker.flush()
        assert seen == []
        # the attacker's own replies reach it
        assert isinstance(
            await RegistryClient(attacker, subjects, principal=a_user).call(
                GetRequest(id="w-none")
            ),
            CommandError,
        )
    for bus in (operator_bus, attacker):
        await bus.close()


async def test_operators_keep_every_right_and_a_worker_puts_its_record_right(
    secured: Secured,
) -> None:
    b_user = secured.workers[1]
    subjects = Subjects.for_prefix(PREFIX)
    operator_bus, _ = await connect(secured, "operator")
    operator = RegistryClient(operator_bus, subjects)
    async with (
        running_registry(secured.url_of("registry"), PREFIX, admin_token=TOKEN) as reg,
        running_worker(secured.url_of(b_user), PREFIX) as b,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
    ):
        assert b.service.lifecycle is not None
        await eventually(lambda: ready(operator, b.service.worker_id))
        own = ok(await operator.call(GetRequest(id=b.service.worker_id)))
        # an operator changes the worker's spec: allowed, and the worker's next check undoes it
        other = WorkerSpec(url="http://10.9.0.2:8000", models=("other",))
        changed = ok(await operator.call(ReplaceRequest(id=own.id, worker=other)))
        assert (changed.url, changed.owner) == (other.url, b_user)

        async def restored() -> bool:
            now = ok(await operator.call(GetRequest(id=own.id)))
            return (now.url, now.models, now.status) == (own.url, own.models, S.READY)

        await eventually(restored, timeout_s=8)  # stay_registered checks every 2 s
        # the admin API marks it failed: allowed; the worker re-registers itself (via Pending)
        admin = f"http://127.0.0.1:{reg.http.port}/workers/{own.id}"
        async with http.patch(admin, json={"status": "failed"}) as resp:
            assert resp.status == 200
        await b.service.lifecycle.check()
        await eventually(lambda: ready(operator, own.id))
        # an operator's drain is on purpose: the worker leaves it alone
        ok(await operator.call(SetStatusRequest(id=own.id, status=S.DRAINING, reason="operator")))
        await b.service.lifecycle.check()
        assert ok(await operator.call(GetRequest(id=own.id))).status == S.DRAINING
        # and operators may remove any record, over NATS or HTTP
        async with http.delete(admin) as resp:
            assert resp.status == 204
    await operator_bus.close()
