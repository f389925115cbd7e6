"""Typed client for the registry's NATS request/reply API (used by workers, the CLI and tests)."""

from __future__ import annotations

from schemas import codec
from schemas.registry import Command, CommandError, CommandReply, RegistrySnapshot
from schemas.subjects import Subjects
from services.common.bus import Bus


class RegistryClient:
    """principal None: an operator's client (full rights); else a worker's, which sends on its
    own subjects and may touch only the records that principal owns."""

    def __init__(
        self,
        bus: Bus,
        subjects: Subjects,
        timeout_s: float = 5.0,
        *,
        principal: str | None = None,
    ) -> None:
        self.bus = bus
        self.subjects = subjects
        self.timeout_s = timeout_s
        self.principal = principal

    async def call(self, command: Command) -> CommandReply:
        """Send one command on the subject of its op; after timeout_s without an answer, NATS's
        error propagates."""
        subject = (
            self.subjects.registry_cmd(command.op)
            if self.principal is None
            else self.subjects.worker_cmd(self.principal, command.op)
        )
        data = await self.bus.request(subject, codec.encode(command), self.timeout_s)
        reply: CommandReply = codec.command_reply_decoder.decode(data)
        return reply

    async def snapshot(self) -> RegistrySnapshot:
        data = await self.bus.request(self.subjects.registry_snapshot, b"", self.timeout_s)
        snap: RegistrySnapshot = codec.snapshot_decoder.decode(data)
        return snap


def is_error(reply: CommandReply) -> bool:
    return isinstance(reply, CommandError)
