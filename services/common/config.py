"""Service config: one frozen Struct per service, read from env and CLI flags, validated at start.

Precedence: CLI flag > `<SERVICE>_<FIELD>` env var > shared env var (NATS_URL, SUBJECT_PREFIX,
LOG_LEVEL, LOG_FORMAT) > the Struct's default. Pure apart from argparse printing --help.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import msgspec

from schemas import subjects
from schemas.codec import error_field
from services.common.errors import ConfigError

# Fields every service shares; their env vars have no service prefix (compose sets them once).
SHARED_ENV = {
    "nats_url": "NATS_URL",
    "subject_prefix": "SUBJECT_PREFIX",
    "log_level": "LOG_LEVEL",
    "log_format": "LOG_FORMAT",
    "nats_connect_timeout_s": "NATS_CONNECT_TIMEOUT_S",
    # Set by `switchboard up` for its children, not by people.
    "instance": "SWITCHBOARD_INSTANCE",
    "listen_fd": "SWITCHBOARD_LISTEN_FD",
}

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class ServiceConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Fields every service has."""

    nats_url: str = "nats://127.0.0.1:4222"
    subject_prefix: str = "fleet"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    # The first connection gives up after this long (later ones are retried forever).
    nats_connect_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    # Which `switchboard up` started this process; /healthz reports it, so `up` knows it is
    # talking to its own child and not to another stack's on the same port.
    instance: str = ""
    # A socket `up` bound (and holds across restarts) for this process to serve on; -1: bind
    # http_host:http_port here.
    listen_fd: int = -1
    # Every HTTP server's limits (services/common/http_limits.py): how long a client may take to
    # send a request head, how long a request body may stall, how many connections are served at
    # once (the next get a 503), and how large a request head may be (larger: 431).
    http_header_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    http_body_idle_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    http_max_connections: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 4096
    http_max_head_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024

    def __post_init__(self) -> None:
        try:
            subjects.prefix(self.subject_prefix)
        except subjects.SubjectError as exc:
            raise ValueError(str(exc)) from None
        if not re.match(r"^(nats|tls|ws|wss)://", self.nats_url):
            raise ValueError(f"nats_url {self.nats_url!r} must start with nats://, tls:// or ws://")


C = TypeVar("C", bound=ServiceConfig)


def env_name(service: str, field: str) -> str:
    return SHARED_ENV.get(field) or f"{service.upper()}_{field.upper()}"


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _is_sequence(tp: Any) -> bool:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    origin = get_origin(tp)
    if origin in (tuple, list):
        return True
    return any(_is_sequence(arg) for arg in get_args(tp)) if origin is not None else False


def _is_mapping(tp: Any) -> bool:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return get_origin(tp) is dict


def _pair(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.strip(), value.strip()


def _coerce(raw: str, tp: Any) -> Any:
    """Env and flags are strings: lists split on ',', maps on ',' and '='; msgspec does the rest."""
    if _is_mapping(tp):
        pairs = [p for p in raw.split(",") if p.strip()]
        return dict(_pair(p) for p in pairs)
    if _is_sequence(tp):
        return [p.strip() for p in raw.split(",") if p.strip()]
    if raw == "" and "None" in repr(tp):
        return None
    return raw


def load_config(cls: type[C], service: str, argv: Sequence[str], environ: Mapping[str, str]) -> C:
    """Build `cls` from environ and argv; raise ConfigError naming the field on bad input."""
    fields = msgspec.structs.fields(cls)
    parser = argparse.ArgumentParser(prog=f"python -m services.{service}")
    for f in fields:
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=None,
            help=f"env {env_name(service, f.name)}",
        )
    args = vars(parser.parse_args(list(argv)))
    raw: dict[str, Any] = {}
    for f in fields:
        value = args.get(f.name)
        if value is None:
            value = environ.get(env_name(service, f.name))
        if value is not None:
            raw[f.name] = _coerce(value, f.type)
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(service, str(exc))) from None


def _explain(service: str, message: str) -> str:
    field = error_field(message)
    if field:
        where = f"{env_name(service, field)} / {flag_name(field)}"
        return f"config error in field '{field}' ({where}): {message}"
    # __post_init__ failures have no path; they name the field in their own message.
    return f"config error: {message}"
