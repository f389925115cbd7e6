"""`switchboard tail`: one readable line per bus message, with sequence gaps marked."""

from __future__ import annotations

import asyncio
import datetime
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from schemas import codec
from services.common.seq import Duplicate, Gap, InOrder, NewEpoch, SequenceTracker

if TYPE_CHECKING:
    from services.cli.ops import NatsTarget


class Filters(msgspec.Struct, frozen=True, kw_only=True):
    worker: str | None = None
    model: str | None = None
    type: str | None = None


def _key_fields(body: Any) -> tuple[str, str]:
    """(type, summary) for a decoded body of any known message kind."""
    if not isinstance(body, dict):
        return "?", repr(body)[:120]
    kind = str(body.get("type", ""))
    if "worker" in body and isinstance(body["worker"], dict):
        w = body["worker"]
        models = ",".join(w.get("models", []))
        return kind, f"id={w.get('id')} url={w.get('url')} models={models} status={w.get('status')}"
    if kind == "worker.replaced":
        old, new = body.get("old", {}), body.get("new", {})
        return kind, (
            f"id={new.get('id')} url={old.get('url')}->{new.get('url')} "
            f"models={','.join(new.get('models', []))} rev={new.get('revision')}"
        )
    if kind == "worker.status_changed":
        return kind, (
            f"id={body.get('worker_id')} {body.get('old_status')}->{body.get('new_status')} "
            f"rev={body.get('revision')} {body.get('reason', '')}".rstrip()
        )
    if kind == "registry.beacon":
        return kind, f"last_seq={body.get('last_seq')} workers={body.get('workers')}"
    if "worker_id" in body and "models" in body:
        loads = " ".join(
            f"{m.get('id')}:{m.get('in_flight')}/{m.get('max_in_flight')}+q{m.get('queue_depth')}"
            for m in body["models"]
        )
        return "worker.load", f"id={body['worker_id']} status={body.get('status')} {loads}"
    if "fleet" in body:
        fleet = body["fleet"]
        per_model = " ".join(
            f"{m}={c.get('capacity')}/{c.get('source')}" for m, c in body.get("models", {}).items()
        )
        return "capacity.view", f"fleet={fleet.get('capacity')}/{fleet.get('source')} {per_model}"
    return kind or "?", msgspec.json.encode(body).decode()[:160]


def _matches(filters: Filters, kind: str, body: Any, summary: str) -> bool:
    if filters.type and not kind.startswith(filters.type):
        return False
    if filters.worker and f"id={filters.worker}" not in summary:
        return False
    if filters.model:
        text = msgspec.json.encode(body).decode() if isinstance(body, dict) else ""
        if f'"{filters.model}"' not in text:
            return False
    return True


class TailFormatter:
    """Pure: turns (subject, payload) into printable lines and tracks seq per (subject, source)."""

    def __init__(self, filters: Filters | None = None) -> None:
        self.filters = filters or Filters()
        self.tracker = SequenceTracker()

    def lines(self, subject: str, data: bytes, received_at: float) -> list[str]:
        stamp = datetime.datetime.fromtimestamp(received_at).strftime("%H:%M:%S.%f")[:-3]
        try:
            env = codec.any_envelope_decoder.decode(data)
        except codec.DecodeError:
            return [f"{stamp} {subject} (not an envelope) {data[:160]!r}"]
        kind, summary = _key_fields(env.body)
        out = self._gap_markers(subject, env.source, env.epoch, env.seq, kind == "registry.beacon")
        if _matches(self.filters, kind, env.body, summary):
            out.append(f"{stamp} {subject} {env.source} #{env.seq} {kind} {summary}")
        return out

    def _gap_markers(
        self, subject: str, source: str, epoch: int, seq: int, beacon: bool
    ) -> list[str]:
        key = f"{subject}|{source}"
        if self.tracker.position(key) is None:
            self.tracker.reset(key, epoch, seq)  # first sight: nothing to compare with
            return []
        verdict = (
            self.tracker.observe_beacon(key, epoch, seq)
            if beacon
            else self.tracker.observe(key, epoch, seq)
        )
        match verdict:
            case InOrder():
                return []
            case Duplicate(seq=got, last=last):
                return (
                    [] if beacon else [f"--- duplicate/old seq {got} (last {last}) from {source}"]
                )
            case Gap(expected=expected, got=got):
                self.tracker.reset(key, epoch, seq)
                lost = got - expected + (1 if beacon else 0)
                return [
                    f"--- GAP on {subject} from {source}: expected #{expected}, got #{got}"
                    f" ({lost} lost)"
                ]
            case NewEpoch(epoch=new, known_epoch=old):
                self.tracker.reset(key, epoch, seq)
                return [f"--- NEW EPOCH on {subject} from {source}: {old} -> {new}"]


async def tail(
    target: NatsTarget,
    pattern: str,
    *,
    filters: Filters,
    raw_json: bool,
    stop: asyncio.Event,
    timeout_s: float = 5.0,
    write: Callable[[str], None] = print,
) -> None:
    """Subscribe to pattern and print until stop is set (NatsConnectError if NATS is not there)."""
    import time

    from services.cli.ops import connect
    from services.common.run import cancel_and_wait, wait_stop_or

    connecting = asyncio.ensure_future(connect(target, "switchboard-tail", timeout_s))
    await wait_stop_or(stop, connecting)  # Ctrl-C while NATS is not there yet
    if not connecting.done():
        await cancel_and_wait(connecting)
        return
    bus = connecting.result()
    formatter = TailFormatter(filters)

    async def on_msg(msg: Any) -> None:
        try:
            if raw_json:
                write(f"{msg.subject} {bytes(msg.data).decode(errors='replace')}")
            else:
                for line in formatter.lines(msg.subject, bytes(msg.data), time.time()):
                    write(line)
            sys.stdout.flush()
        except BrokenPipeError:  # `switchboard tail | head`: the reader is gone, so are we
            stop.set()

    await bus.subscribe(pattern, cb=on_msg)
    try:
        await stop.wait()
    finally:
        await bus.close()
