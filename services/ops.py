"""Operator commands: `switchboard status` (the fleet in one table), `drain`, `compose-env`."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

from schemas import codec
from schemas.capacity import CapacityView
from schemas.load import WorkerLoad
from schemas.registry import CommandOk, RegistrySnapshot, SetStatusRequest, WorkerStatus
from schemas.subjects import Subjects
from services.common import natsauth
from services.common.bus import Bus, Message, NoRespondersError, RequestTimeout
from services.registry.client import RegistryClient


def render_status(
    snap: RegistrySnapshot,
    loads: dict[str, tuple[float, WorkerLoad]],
    capacity: CapacityView | None,
    now: float,
) -> str:
    """Pure: the status table. loads maps worker id -> (received_at, load)."""
    rows = [("WORKER", "STATUS", "URL", "MODEL", "IN_FLIGHT", "QUEUE", "HEARTBEAT")]
    for record in snap.workers:
        seen = loads.get(record.id)
        age = "never" if seen is None else f"{now - seen[0]:.1f}s ago"
        per_model = {} if seen is None else {m.id: m for m in seen[1].models}
        for i, model in enumerate(record.models or ("-",)):
            m = per_model.get(model)
            in_flight = "?" if m is None else f"{m.in_flight}/{m.max_in_flight}"
            queue = "?" if m is None else f"{m.queue_depth}/{m.max_queue_depth}"
            first = i == 0
            rows.append(
                (
                    record.id if first else "",
                    record.status.value if first else "",
                    record.url if first else "",
                    model,
                    in_flight,
                    queue,
                    age if first else "",
                )
            )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.append("")
    lines.append(f"registry epoch {snap.epoch} seq {snap.seq}, {len(snap.workers)} workers")
    if capacity is None:
        lines.append("capacity: unknown (capacity service not answering)")
    else:
        fleet = capacity.fleet
        lines.append(
            f"capacity: fleet {fleet.capacity} ({fleet.source.value}, "
            f"{fleet.workers_available} healthy)"
        )
        for model, entry in sorted(capacity.models.items()):
            lines.append(
                f"  {model}: {entry.capacity} ({entry.source.value}, "
                f"{entry.workers_available} healthy)"
            )
    return "\n".join(lines)


async def status(nats_url: str, prefix: str, listen_s: float = 1.5) -> str:
    subjects = Subjects.for_prefix(prefix)
    bus = await Bus.connect(nats_url, "switchboard-status")
    loads: dict[str, tuple[float, WorkerLoad]] = {}

    async def on_load(msg: Message) -> None:
        try:
            env = codec.load_decoder.decode(msg.data)
        except codec.DecodeError:
            return
        loads[env.body.worker_id] = (time.time(), env.body)

    try:
        await bus.subscribe(subjects.load_all, cb=on_load)
        snap = await RegistryClient(bus, subjects).snapshot()
        try:
            capacity = codec.capacity_decoder.decode(
                await bus.request(subjects.capacity_snapshot, b"", 2.0)
            )
        except (NoRespondersError, RequestTimeout):
            capacity = None
        await asyncio.sleep(listen_s)  # every live worker heartbeats at least this often
        return render_status(snap, loads, capacity, time.time())
    finally:
        await bus.close()


class ComposeEnvExists(Exception):
    """The .env file is there already; replacing credentials must be asked for."""


def write_compose_env(out: Path, *, force: bool = False) -> Path:
    """docker compose's .env: the admin token, the router's API key, NATS passwords (0600)."""
    from services.supervisor import private_file

    if out.exists() and not force:
        raise ComposeEnvExists(str(out))
    lines = ["# docker compose credentials from `switchboard compose-env`; keep this file private."]
    lines.append(f"SWITCHBOARD_ADMIN_TOKEN={secrets.token_urlsafe(24)}")
    # The router's API keys (comma-separated: add one per client); clients send one as Bearer.
    lines.append(f"ROUTER_API_KEYS=sk-sb-{secrets.token_urlsafe(24)}")
    lines += [
        f"{natsauth.password_env(role)}={secrets.token_urlsafe(18)}" for role in natsauth.ROLES
    ]
    return private_file(out, "\n".join(lines) + "\n")


async def drain(nats_url: str, prefix: str, worker_id: str, undo: bool = False) -> str:
    """Draining: routers stop sending it new requests, capacity stops counting it."""
    bus = await Bus.connect(nats_url, "switchboard-drain")
    try:
        target = WorkerStatus.READY if undo else WorkerStatus.DRAINING
        reply = await RegistryClient(bus, Subjects.for_prefix(prefix)).call(
            SetStatusRequest(id=worker_id, status=target, reason="operator")
        )
    finally:
        await bus.close()
    if isinstance(reply, CommandOk) and reply.worker is not None:
        return f"{worker_id}: {reply.worker.status.value} (revision {reply.worker.revision})"
    raise SystemExit(f"switchboard drain: {reply.message}")  # type: ignore[union-attr]
