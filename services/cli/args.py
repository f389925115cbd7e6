"""The `switchboard` command line: every subcommand's flags, and flag values checked as typed."""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import NoReturn

from services.common.errors import ServiceError


class UsageError(ServiceError):
    """A flag value `up` cannot work with; the message names the flag as typed."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (usage stays behind --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def _count(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {least}")
        return int(text)

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0-3600)")
    return value


def _refuse_token(text: str) -> str:
    # Refused rather than warned about: by the time a warning shows, the token has been in the
    # process list (/proc/PID/cmdline, readable by every local user) and in shell history.
    raise argparse.ArgumentTypeError(
        "a token on the command line can be read by every local user (ps); put it in "
        "SWITCHBOARD_ADMIN_TOKEN or in a file for --admin-token-file"
    )


def admin_token(args: argparse.Namespace, environ: dict[str, str]) -> str:
    """--admin-token-file's first line, else SWITCHBOARD_ADMIN_TOKEN, else none."""
    if args.admin_token_file is None:
        return environ.get("SWITCHBOARD_ADMIN_TOKEN", "")
    path = Path(args.admin_token_file)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--admin-token-file {path}: cannot read it ({exc})") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise UsageError(f"--admin-token-file {path}: the file is empty")
    if path.stat().st_mode & 0o077:
        print(
            f"switchboard up: warning: --admin-token-file {path} can be read by others (chmod 600)"
        )
    return token


def _version() -> str:
    try:
        return metadata.version("switchboard-llm")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _state_dir_default() -> str:
    return os.environ.get("SWITCHBOARD_STATE_DIR") or ".switchboard"


def _prefix_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prefix",
        default=os.environ.get("SUBJECT_PREFIX", "fleet"),
        help="subject prefix of the fleet (env SUBJECT_PREFIX; default fleet)",
    )


def _operator_flags(p: argparse.ArgumentParser) -> None:
    """Where an operator command finds NATS: see services.cli.ops.find_nats for the order."""
    p.add_argument(
        "--nats-url",
        default=None,
        help="NATS to talk to (default: NATS_URL, else the credentials of the running "
        "`switchboard up`)",
    )
    p.add_argument(
        "--state-dir",
        default=None,
        help="read the credentials from this `up` state dir (env SWITCHBOARD_STATE_DIR)",
    )
    _prefix_flag(p)
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=5.0,
        help="seconds to wait for NATS and for the registry's answer (default 5)",
    )


def _up_epilog() -> str:
    from services.cli.stack import passthrough_env

    lines = [
        "Environment: `up` reads NATS_URL (--nats-url), SUBJECT_PREFIX (--prefix), "
        "SWITCHBOARD_ADMIN_TOKEN (--admin-token-file) and SWITCHBOARD_STATE_DIR (--state-dir). "
        "It hands these on to the services unchanged (ports, NATS credentials, prefix and log "
        "format it sets itself):"
    ]
    for service, names in passthrough_env().items():
        lines.append(f"  {service}: {', '.join(names)}")
    return "\n".join(
        textwrap.fill(line, 100, subsequent_indent="      " if line.startswith("  ") else "")
        for line in lines
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="switchboard", description="LLM inference fleet gateway")
    p.add_argument("--version", action="version", version=f"switchboard {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="run the whole stack on this machine (embedded NATS)",
        epilog=_up_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("--workers", type=_count(0), default=2, help="number of workers (default 2)")
    up.add_argument(
        "--routers", type=_count(1), default=1, help="router processes on one port (default 1)"
    )
    up.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "exllamav2", "transformers", "sim"],
        help="inference engine of the workers (default auto: exllamav2 with a GPU and --model, "
        "else transformers on CPU; sim: a simulator, no model)",
    )
    up.add_argument(
        "--model", default=None, help="model directory for real engines (default: a demo model)"
    )
    up.add_argument(
        "--nats-url",
        default=os.environ.get("NATS_URL"),
        help="use this NATS instead of an embedded one (env NATS_URL)",
    )
    up.add_argument(
        "--nats-port", type=_port, default=4222, help="embedded NATS port (default 4222)"
    )
    up.add_argument(
        "--state-dir",
        default=_state_dir_default(),
        help="JetStream data and generated files (env SWITCHBOARD_STATE_DIR; default .switchboard)",
    )
    _prefix_flag(up)
    up.add_argument(
        "--registry-port", type=_port, default=8081, help="registry admin API port (default 8081)"
    )
    up.add_argument(
        "--capacity-port", type=_port, default=8082, help="capacity /metrics port (default 8082)"
    )
    up.add_argument(
        "--worker-base-port",
        type=_port,
        default=8100,
        help="first worker's port; worker N uses this + N - 1 (default 8100)",
    )
    up.add_argument(
        "--router-port", type=_port, default=8080, help="the ingress port (default 8080)"
    )
    up.add_argument(
        "--admin-token",
        type=_refuse_token,
        default=None,
        metavar="TOKEN",
        help="refused: any local user can read a command line (ps); use "
        "SWITCHBOARD_ADMIN_TOKEN or --admin-token-file",
    )
    up.add_argument(
        "--admin-token-file",
        default=None,
        metavar="FILE",
        help="registry admin bearer token, the first line of FILE (default: env "
        "SWITCHBOARD_ADMIN_TOKEN; none: the admin API is open on loopback only)",
    )
    up.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="services' log lines (default text)",
    )

    nats = sub.add_parser("nats", help="run only the embedded nats-server with JetStream")
    nats.add_argument("--port", type=_port, default=4222, help="client port (default 4222)")
    nats.add_argument(
        "--state-dir",
        default=_state_dir_default(),
        help="JetStream data goes to <state-dir>/nats (env SWITCHBOARD_STATE_DIR)",
    )

    demo = sub.add_parser("make-demo-model", help="write a tiny random-weight Llama checkpoint")
    demo.add_argument("directory", help="where to write it (created)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the weights")

    conf = sub.add_parser(
        "nats-config", help="print nats-server config: one user per service role (deploy/)"
    )
    _prefix_flag(conf)

    cenv = sub.add_parser("compose-env", help="write .env with fresh credentials for compose")
    cenv.add_argument("--output", default=".env", help="file to write (default .env)")
    cenv.add_argument("--force", action="store_true", help="replace an existing file")

    status = sub.add_parser("status", help="one table: workers, load, heartbeat age, capacity")
    _operator_flags(status)

    drain = sub.add_parser("drain", help="stop routing new requests to a worker (--undo: resume)")
    drain.add_argument("worker_id", help="the worker's id (see `switchboard status`)")
    drain.add_argument("--undo", action="store_true", help="set the worker Ready again")
    _operator_flags(drain)

    tail = sub.add_parser("tail", help="print bus messages, one line each, marking seq gaps")
    tail.add_argument(
        "pattern", nargs="?", default=None, help="subject pattern (default <prefix>.>)"
    )
    _operator_flags(tail)
    tail.add_argument("--json", action="store_true", help="print raw JSON payloads")
    tail.add_argument("--worker", default=None, help="only messages about this worker id")
    tail.add_argument("--model", default=None, help="only messages mentioning this model")
    tail.add_argument("--type", default=None, help="only this message type (prefix match)")
    return p
