"""Every NATS subject Switchboard uses, built from a prefix; the one place subject strings live.

Ids that become subject tokens are validated here: no '.', '*', '>', whitespace, a leading '$'
(reserved by NATS), or an empty token. A worker's subjects carry its principal (its NATS user), so
nats-server's per-user permissions decide who may speak for whom. No I/O.
"""

from __future__ import annotations

import re

from schemas.base import WireStruct
from schemas.registry import COMMANDS

_BAD_TOKEN = re.compile(r"[.*>\s]")
# The ops that have a command subject: exactly the registry's command table.
COMMAND_OPS = tuple(COMMANDS)
DEFAULT_INBOX = "_INBOX"


class SubjectError(ValueError):
    """A string cannot be used as (part of) a NATS subject."""


def token(value: str, *, what: str = "token") -> str:
    """Return value if it is one safe subject token, else raise SubjectError naming `what`."""
    if not value:
        raise SubjectError(f"{what} must not be empty")
    if value.startswith("$"):
        raise SubjectError(f"{what} {value!r} must not start with '$'")
    found = _BAD_TOKEN.search(value)
    if found:
        raise SubjectError(f"{what} {value!r} must not contain {found.group()!r}")
    return value


def prefix(value: str) -> str:
    """A prefix is one or more dot-separated tokens ("fleet", "prod.fleet")."""
    if not value:
        raise SubjectError("subject prefix must not be empty")
    for part in value.split("."):
        token(part, what="subject prefix token")
    return value


def inbox_prefix(user: str) -> str:
    """Replies to a connection of NATS user `user` arrive under this prefix (one per user, so a
    credential may subscribe only to its own replies); no user: nats-py's default."""
    return f"{DEFAULT_INBOX}_{token(user, what='NATS user')}" if user else DEFAULT_INBOX


class Subjects(WireStruct, frozen=True, kw_only=True):
    """The subjects of one fleet, all under `prefix`."""

    prefix: str

    @classmethod
    def for_prefix(cls, value: str) -> Subjects:
        return cls(prefix=prefix(value))

    @property
    def all(self) -> str:
        return f"{self.prefix}.>"

    @property
    def registry_events(self) -> str:
        return f"{self.prefix}.registry.events"

    @property
    def registry_snapshot(self) -> str:
        return f"{self.prefix}.registry.snapshot"

    def registry_cmd(self, op: str) -> str:
        if op not in COMMAND_OPS:
            raise SubjectError(f"unknown registry command {op!r}")
        return f"{self.prefix}.registry.cmd.{op}"

    @property
    def registry_cmd_all(self) -> str:
        """Operators' commands (full rights over every record)."""
        return f"{self.prefix}.registry.cmd.*"

    def worker_cmd(self, principal: str, op: str) -> str:
        """A worker's command: the registry lets `principal` change only its own records."""
        self.registry_cmd(op)  # validates op
        return f"{self._worker_cmd}.{token(principal, what='principal')}.{op}"

    def worker_cmd_of(self, principal: str) -> str:
        """Every command subject of one principal (what its NATS user may publish)."""
        return f"{self._worker_cmd}.{token(principal, what='principal')}.*"

    @property
    def worker_cmd_all(self) -> str:
        return f"{self._worker_cmd}.*.*"

    def parse_worker_cmd(self, subject: str) -> tuple[str, str] | None:
        """(principal, op) of a worker command subject, else None."""
        return _two_tokens(subject, self._worker_cmd)

    @property
    def _worker_cmd(self) -> str:
        return f"{self.prefix}.registry.wcmd"

    def load(self, principal: str, worker_id: str) -> str:
        """Heartbeats of worker_id, published by the NATS user `principal` that owns its record."""
        return f"{self.load_of(principal)[:-1]}{token(worker_id, what='worker id')}"

    def load_of(self, principal: str) -> str:
        """Every heartbeat subject of one principal (what its NATS user may publish)."""
        return f"{self.prefix}.load.{token(principal, what='principal')}.*"

    @property
    def load_all(self) -> str:
        return f"{self.prefix}.load.*.*"

    def parse_load(self, subject: str) -> tuple[str, str] | None:
        """(principal, worker id) of a heartbeat subject, else None."""
        return _two_tokens(subject, f"{self.prefix}.load")

    def kv(self, principal: str, worker_id: str) -> str:
        """Prefix-cache block events of worker_id (schemas/kv.py), published by its owner."""
        return f"{self.kv_of(principal)[:-1]}{token(worker_id, what='worker id')}"

    def kv_of(self, principal: str) -> str:
        """Every block-event subject of one principal (what its NATS user may publish)."""
        return f"{self.prefix}.kv.{token(principal, what='principal')}.*"

    @property
    def kv_all(self) -> str:
        return f"{self.prefix}.kv.*.*"

    def parse_kv(self, subject: str) -> tuple[str, str] | None:
        """(principal, worker id) of a block-event subject, else None."""
        return _two_tokens(subject, f"{self.prefix}.kv")

    @property
    def capacity_view(self) -> str:
        return f"{self.prefix}.capacity.view"

    @property
    def capacity_snapshot(self) -> str:
        return f"{self.prefix}.capacity.snapshot"

    def kv_bucket(self, name: str) -> str:
        """JetStream KV bucket names allow only [A-Za-z0-9_-]: dots in the prefix become '_'."""
        token(name, what="bucket name")
        return f"{self.prefix.replace('.', '_')}_{name}"


def _two_tokens(subject: str, under: str) -> tuple[str, str] | None:
    head, dot, rest = subject.partition(f"{under}.")
    parts = rest.split(".")
    if head or not dot or len(parts) != 2 or not all(parts):
        return None
    return parts[0], parts[1]
