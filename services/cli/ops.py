"""Operator commands: `switchboard status` (the fleet in one table), `drain`, `compose-env`,
and how they find the NATS that `switchboard up` runs, from any working directory."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

import msgspec

from schemas import codec
from schemas.capacity import CapacityView
from schemas.load import WorkerLoad
from schemas.registry import CommandOk, RegistrySnapshot, SetStatusRequest, WorkerStatus
from schemas.subjects import Subjects
from services.cli import natsauth
from services.common.bus import Bus, Message, NoRespondersError, RequestTimeout
from services.common.errors import ServiceError
from services.registry.client import RegistryClient

DEFAULT_STATE_DIR = ".switchboard"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class OperatorError(ServiceError):
    """An operator command cannot do its job; the message says why in one line."""


class NatsTarget(msgspec.Struct, frozen=True):
    url: str
    source: str  # where the URL came from, for error messages


def pointer_file(environ: Mapping[str, str]) -> Path:
    """Where `up` records its state dir: $XDG_STATE_HOME/switchboard/last-up (XDG default
    ~/.local/state), so commands run from any directory find its credentials."""
    base = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME", "~")) / ".local/state")
    return Path(base).expanduser() / "switchboard" / "last-up"


def record_state_dir(state_dir: Path, environ: Mapping[str, str]) -> Path:
    pointer = pointer_file(environ)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(f"{state_dir.resolve()}\n")
    return pointer


def forget_state_dir(state_dir: Path, environ: Mapping[str, str]) -> None:
    """Remove the pointer if it still names state_dir (a later `up` may have replaced it)."""
    pointer = pointer_file(environ)
    try:
        if Path(pointer.read_text().strip()) == state_dir.resolve():
            pointer.unlink()
    except OSError:
        pass


def _saved(state_dir: Path, how: str) -> NatsTarget:
    saved = state_dir / natsauth.OPERATOR_URL_FILE
    try:
        return NatsTarget(saved.read_text().strip(), f"credentials from {saved}")
    except OSError:
        raise OperatorError(
            f"no {saved} ({how}): is `switchboard up --state-dir {state_dir}` running?"
        ) from None


def find_nats(
    nats_url: str | None, state_dir: str | None, environ: Mapping[str, str]
) -> NatsTarget:
    """The NATS an operator command talks to, first found of: --nats-url, --state-dir,
    NATS_URL, SWITCHBOARD_STATE_DIR, the last `up`'s state dir (pointer_file),
    ./.switchboard, the default URL."""
    if nats_url:
        return NatsTarget(nats_url, "from --nats-url")
    if state_dir:
        return _saved(Path(state_dir), "--state-dir")
    if environ.get("NATS_URL"):
        return NatsTarget(environ["NATS_URL"], "from NATS_URL")
    if environ.get("SWITCHBOARD_STATE_DIR"):
        return _saved(Path(environ["SWITCHBOARD_STATE_DIR"]), "SWITCHBOARD_STATE_DIR")
    try:
        last_up = Path(pointer_file(environ).read_text().strip())
        if (last_up / natsauth.OPERATOR_URL_FILE).is_file():
            return _saved(last_up, f"recorded in {pointer_file(environ)}")
    except OSError:
        pass
    if (Path(DEFAULT_STATE_DIR) / natsauth.OPERATOR_URL_FILE).is_file():
        return _saved(Path(DEFAULT_STATE_DIR), "in this directory")
    return NatsTarget(DEFAULT_NATS_URL, "the default: no running `switchboard up` found")


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
        # a live worker's heartbeat reached us while we listened; a dead one's last is the
        # registry's (it keeps when it last heard each worker)
        heard = seen[0] if seen is not None else snap.heard_at.get(record.id)
        age = "never" if heard is None else f"{max(0.0, now - heard):.1f}s ago"
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


async def connect(target: NatsTarget, name: str, timeout_s: float) -> Bus:
    return await Bus.connect(target.url, name, first_connect_s=timeout_s, source=target.source)


def _no_registry(prefix: str) -> OperatorError:
    return OperatorError(
        f"no registry answers on prefix {prefix!r}: is the stack up, and is --prefix right?"
    )


async def status(target: NatsTarget, prefix: str, timeout_s: float, listen_s: float = 1.5) -> str:
    subjects = Subjects.for_prefix(prefix)
    bus = await connect(target, "switchboard-status", timeout_s)
    heard: dict[tuple[str, str], tuple[float, WorkerLoad]] = {}  # (principal, id) -> load

    async def on_load(msg: Message) -> None:
        try:
            env = codec.load_decoder.decode(msg.data)
        except codec.DecodeError:
            return
        parsed = subjects.parse_load(msg.subject)
        if parsed is not None and parsed[1] == env.body.worker_id:
            heard[parsed] = (time.time(), env.body)

    try:
        await bus.subscribe(subjects.load_all, cb=on_load)
        try:
            snap = await RegistryClient(bus, subjects, timeout_s).snapshot()
        except (NoRespondersError, RequestTimeout):
            raise _no_registry(prefix) from None
        try:
            capacity = codec.capacity_decoder.decode(
                await bus.request(subjects.capacity_snapshot, b"", 2.0)
            )
        except (NoRespondersError, RequestTimeout):
            capacity = None
        await asyncio.sleep(listen_s)  # every live worker heartbeats at least this often
        # Only a record's owner speaks for it (another worker may publish under its own name).
        loads = {r.id: heard[r.owner, r.id] for r in snap.workers if (r.owner, r.id) in heard}
        return render_status(snap, loads, capacity, time.time())
    finally:
        await bus.close()


class ComposeEnvExists(Exception):
    """The .env file is there already; replacing credentials must be asked for."""


def write_compose_env(out: Path, *, force: bool = False) -> Path:
    """docker compose's .env: the admin token, the router's API key, NATS passwords (0600)."""
    from services.cli.child import private_file

    if out.exists() and not force:
        raise ComposeEnvExists(str(out))
    lines = ["# docker compose credentials from `switchboard compose-env`; keep this file private."]
    lines.append(f"SWITCHBOARD_ADMIN_TOKEN={secrets.token_urlsafe(24)}")
    # The router's API keys (comma-separated: add one per client); clients send one as Bearer.
    lines.append(f"ROUTER_API_KEYS=sk-sb-{secrets.token_urlsafe(24)}")
    lines += [
        f"{natsauth.password_env(user)}={secrets.token_urlsafe(18)}"
        for user in natsauth.COMPOSE_USERS
    ]
    return private_file(out, "\n".join(lines) + "\n")


async def drain(
    target: NatsTarget, prefix: str, worker_id: str, timeout_s: float, undo: bool = False
) -> str:
    """Draining: routers stop sending it new requests, capacity stops counting it."""
    bus = await connect(target, "switchboard-drain", timeout_s)
    try:
        wanted = WorkerStatus.READY if undo else WorkerStatus.DRAINING
        reply = await RegistryClient(bus, Subjects.for_prefix(prefix), timeout_s).call(
            SetStatusRequest(id=worker_id, status=wanted, reason="operator")
        )
    except (NoRespondersError, RequestTimeout):
        raise _no_registry(prefix) from None
    finally:
        await bus.close()
    if isinstance(reply, CommandOk) and reply.worker is not None:
        return f"{worker_id}: {reply.worker.status.value} (revision {reply.worker.revision})"
    raise OperatorError(reply.message)  # type: ignore[union-attr]
