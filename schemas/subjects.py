"""Every NATS subject Switchboard uses, built from a prefix; the one place subject strings live.

Ids that become subject tokens are validated here: no '.', '*', '>', whitespace, a leading '$'
(reserved by NATS), or an empty token. No I/O.
"""

from __future__ import annotations

import re

from schemas.base import WireStruct

_BAD_TOKEN = re.compile(r"[.*>\s]")
COMMAND_OPS = ("register", "replace", "upsert", "set_status", "remove", "get", "list")


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
        return f"{self.prefix}.registry.cmd.*"

    def load(self, worker_id: str) -> str:
        return f"{self.prefix}.load.{token(worker_id, what='worker id')}"

    @property
    def load_all(self) -> str:
        return f"{self.prefix}.load.*"

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
