"""Per-role NATS users and subject permissions, rendered as nats-server config. Pure, no I/O.

Least privilege per role: a worker may publish only its load heartbeats and registry commands and
never touch JetStream (`$JS.API.>`) or KV (`$KV.>`) — a KV client with publish rights can wipe a
bucket with a rollup header. Only the registry publishes registry events; only capacity
publishes capacity views. Request/reply works through `allow_responses` and `_INBOX.>`.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote

ROLES = ("registry", "capacity", "worker", "router", "operator")


def permissions(role: str, prefix: str) -> dict[str, object]:
    p = prefix
    kv = prefix.replace(".", "_")

    def js_kv(bucket: str) -> list[str]:
        """JetStream API and KV subjects for one KV bucket (and nothing else)."""
        stream = f"KV_{kv}_{bucket}"
        return [
            f"$JS.API.STREAM.*.{stream}",
            f"$JS.API.CONSUMER.*.{stream}",
            f"$JS.API.CONSUMER.*.{stream}.>",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            "$JS.API.INFO",
            f"$KV.{kv}_{bucket}.>",
        ]

    table: dict[str, tuple[list[str], list[str]]] = {
        # role: (may publish, may subscribe)
        "registry": (
            [f"{p}.registry.events", *js_kv("registry")],
            [f"{p}.registry.cmd.*", f"{p}.registry.snapshot", f"{p}.load.*"],
        ),
        "capacity": (
            [f"{p}.capacity.view", f"{p}.registry.snapshot", *js_kv("capacity")],
            [f"{p}.registry.events", f"{p}.capacity.snapshot"],
        ),
        "worker": ([f"{p}.load.*", f"{p}.registry.cmd.*"], []),
        "router": (
            [f"{p}.registry.snapshot", f"{p}.capacity.snapshot"],
            [f"{p}.registry.events", f"{p}.load.*", f"{p}.capacity.view"],
        ),
        "operator": (
            [f"{p}.registry.snapshot", f"{p}.capacity.snapshot", f"{p}.registry.cmd.*"],
            [f"{p}.>"],
        ),
    }
    publish, subscribe = table[role]
    return {
        "publish": {"allow": publish},
        "subscribe": {"allow": [*subscribe, "_INBOX.>"]},
        "allow_responses": True,
    }


def password_env(role: str) -> str:
    """The environment variable that holds a role's password where the config references it."""
    return f"NATS_{role.upper()}_PASSWORD"


def render_config(prefix: str, passwords: dict[str, str] | None = None) -> str:
    """nats-server config text (JSON is valid nats-server config syntax).

    passwords None: each password is a `$NATS_<ROLE>_PASSWORD` reference, which nats-server
    resolves from its environment at start (and refuses to start when one is unset), so the file
    itself holds no secret and can be committed (docker-compose uses it that way).
    """
    users = [
        {
            "user": role,
            "password": _ENV_MARK + password_env(role) if passwords is None else passwords[role],
            "permissions": permissions(role, prefix),
        }
        for role in ROLES
    ]
    text = json.dumps({"authorization": {"users": users}}, indent=2)
    # A variable reference must be a bare token, not a JSON string.
    return re.sub(rf'"{_ENV_MARK}([A-Z_]+)"', r"$\1", text)


_ENV_MARK = "@env:"


def url_for(base_url: str, role: str, password: str) -> str:
    """nats://host:port -> nats://role:password@host:port (nats-py reads credentials from it)."""
    scheme, rest = base_url.split("://", 1)
    return f"{scheme}://{quote(role, safe='')}:{quote(password, safe='')}@{rest}"
