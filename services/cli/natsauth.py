"""NATS users and their subject permissions, rendered as nats-server config. Pure, no I/O.

Least privilege per role: a worker may publish only its own heartbeats and its own registry
commands (subjects that carry its user name, its principal) and never touch JetStream
(`$JS.API.>`) or KV (`$KV.>`): a KV client with publish rights can wipe a bucket with a rollup
header. Only the registry publishes registry events; only capacity publishes capacity views. Each
user receives replies under its own inbox prefix (`_INBOX_<user>`), so no credential can read the
replies meant for another; responses go out through `allow_responses`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from urllib.parse import quote

from schemas.subjects import Subjects, inbox_prefix, token

# In `up`'s state dir: the NATS URL with the operator's credentials, written by `up` and read by
# `switchboard status`, `tail` and `drain`.
OPERATOR_URL_FILE = "operator-url"
ROLES = ("registry", "capacity", "worker", "router", "operator")
# Users named after their role; every other user is a worker principal.
SERVICE_USERS = ("registry", "capacity", "router", "operator")
# docker-compose's users: one per worker service. The replicas of a scaled service share their
# service's user, so they are one trust domain (each may change the others' records).
COMPOSE_USERS = (*SERVICE_USERS, "worker", "worker-gpu")


def role_of(user: str) -> str:
    return user if user in SERVICE_USERS else "worker"


def permissions(role: str, prefix: str, user: str = "") -> dict[str, object]:
    """The permissions of NATS user `user` (default: named after the role)."""
    user = token(user or role, what="NATS user")
    s = Subjects.for_prefix(prefix)
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
            [s.registry_events, *js_kv("registry")],
            [s.registry_cmd_all, s.worker_cmd_all, s.registry_snapshot, s.load_all],
        ),
        "capacity": (
            [s.capacity_view, s.registry_snapshot, *js_kv("capacity")],
            [s.registry_events, s.capacity_snapshot],
        ),
        "worker": ([s.load_of(user), s.kv_of(user), s.worker_cmd_of(user)], []),
        "router": (
            [s.registry_snapshot, s.capacity_snapshot],
            [s.registry_events, s.load_all, s.kv_all, s.capacity_view],
        ),
        "operator": (
            [s.registry_snapshot, s.capacity_snapshot, s.registry_cmd_all],
            [s.all],
        ),
    }
    publish, subscribe = table[role]
    return {
        "publish": {"allow": publish},
        "subscribe": {"allow": [*subscribe, f"{inbox_prefix(user)}.>"]},
        "allow_responses": True,
    }


def password_env(user: str) -> str:
    """The environment variable that holds a user's password where the config references it."""
    return f"NATS_{re.sub(r'[^A-Z0-9]', '_', user.upper())}_PASSWORD"


def render_config(
    prefix: str,
    passwords: Mapping[str, str] | None = None,
    users: Sequence[str] = COMPOSE_USERS,
) -> str:
    """nats-server config text (JSON is valid nats-server config syntax).

    passwords maps each user to its password (its keys are the users). None: `users`, each
    password a `$NATS_<USER>_PASSWORD` reference, which nats-server resolves from its environment
    at start (and refuses to start when one is unset), so the file itself holds no secret and can
    be committed (docker-compose uses it that way).
    """
    names = list(users) if passwords is None else list(passwords)
    rendered = [
        {
            "user": user,
            "password": _ENV_MARK + password_env(user) if passwords is None else passwords[user],
            "permissions": permissions(role_of(user), prefix, user),
        }
        for user in names
    ]
    text = json.dumps({"authorization": {"users": rendered}}, indent=2)
    # A variable reference must be a bare token, not a JSON string.
    return re.sub(rf'"{_ENV_MARK}([A-Z0-9_]+)"', r"$\1", text)


_ENV_MARK = "@env:"


def url_for(base_url: str, user: str, password: str) -> str:
    """nats://host:port -> nats://user:password@host:port (nats-py reads credentials from it)."""
    scheme, rest = base_url.split("://", 1)
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{rest}"
