"""The registry's NATS edge (http.py is its HTTP edge): commands, heartbeats, snapshot requests.

A command's op is the last token of its subject; its body is the bare request JSON, decoded as the
type COMMANDS names for that op. An op outside the table, or a body that does not decode, is
answered `invalid` and changes nothing.
"""

from __future__ import annotations

import asyncio

from schemas import codec
from schemas.registry import COMMANDS, Command, CommandError, CommandReply
from services.common.bus import Message, decode_or_reject, reply
from services.registry.core import OPERATOR
from services.registry.shell import Registry

# One decoder per op of the command table, built once.
COMMAND_DECODERS: dict[str, codec.Decoder[Command]] = {
    op: codec.Decoder(type_) for op, type_ in COMMANDS.items()
}


class NatsEdge:
    """The callbacks main.py subscribes, each one translating messages to calls on the Registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.subjects = registry.subjects
        self.metrics = registry.metrics

    async def on_command(self, msg: Message) -> None:
        """An operator's command (<p>.registry.cmd.<op>): full rights."""
        await self._command(msg, msg.subject.rsplit(".", 1)[-1], OPERATOR)

    async def on_worker_command(self, msg: Message) -> None:
        """A worker's command (<p>.registry.wcmd.<principal>.<op>): nats-server lets only the
        NATS user `principal` publish there, so the subject says who is asking."""
        parsed = self.subjects.parse_worker_cmd(msg.subject)
        if parsed is None:  # cannot happen with our subscription; never run it as an operator
            return
        principal, op = parsed
        await self._command(msg, op, principal)

    async def _command(self, msg: Message, op: str, principal: str) -> None:
        """Decode the body as the request type the op names (COMMANDS), then dispatch it."""
        decoder = COMMAND_DECODERS.get(op)
        if decoder is None:
            result: CommandReply = CommandError(code="invalid", message=f"unknown op {op!r}")
            self.metrics.commands.labels("unknown", "invalid").inc()
        else:
            try:
                request = decoder.decode(msg.data)
            except codec.DecodeError as exc:
                self.metrics.commands.labels(op, "invalid").inc()
                self.metrics.bus.rejected.labels(f"registry.cmd.{op}").inc()
                result = CommandError(code="invalid", message=f"bad {op} request: {exc}")
            else:
                result = await self.registry.dispatch(request, principal)
        await reply(msg, codec.encode(result))

    async def on_snapshot(self, msg: Message) -> None:
        await reply(msg, codec.encode(await self.registry.snapshot()))

    async def on_load(self, msg: Message) -> None:
        """A heartbeat on <p>.load.<principal>.<worker id>: nats-server lets only that principal
        publish there; the id in the body must be the subject's."""
        parsed = self.subjects.parse_load(msg.subject)
        env = decode_or_reject(codec.load_decoder, msg.data, self.metrics.bus, "load")
        if env is None:
            return
        if parsed is None or parsed[1] != env.body.worker_id:
            self.metrics.bus.rejected.labels("load").inc()
        else:
            await self.registry.heartbeat(env.body, parsed[0])
        # nats-py runs this subscription's queued messages back to back, and a heartbeat that
        # changes nothing never waits: a burst (a fleet started together beats in step) would
        # hold every command queued behind it for the whole burst. Yield, so they go in between.
        await asyncio.sleep(0)
