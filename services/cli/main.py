"""The `switchboard` command: up, nats, tail, status, drain, and deployment helpers."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import textwrap
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any, NoReturn

from schemas.subjects import SubjectError, Subjects
from services.common.errors import ServiceError
from services.common.run import cancel_and_wait, install_stop_signals, wait_stop_or

Handler = Callable[[argparse.Namespace, asyncio.Event], Awaitable[int]]
INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C


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


def _admin_token(args: argparse.Namespace, environ: dict[str, str]) -> str:
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


def _parser() -> argparse.ArgumentParser:
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


async def _check_up(args: argparse.Namespace) -> None:
    """What would make a worker fail at start, found before anything starts."""
    from services.worker.engines.demo_model import is_model_dir

    if args.engine == "exllamav2":
        if find_spec("exllamav2") is None:
            raise UsageError(
                "--engine exllamav2 needs a CUDA GPU and the exllamav2 package, which is not "
                "installed (--engine auto or transformers runs on CPU)"
            )
        from services.worker.engines.exl2 import cuda_ready

        ok, why = await asyncio.to_thread(cuda_ready)
        if not ok:
            raise UsageError(f"--engine exllamav2 cannot run here: {why}")
        if args.model is None:
            raise UsageError("--engine exllamav2 needs --model (a model directory)")
    if args.engine == "transformers" and find_spec("transformers") is None:
        raise UsageError("--engine transformers needs the transformers package (not installed)")
    if args.model is not None and not is_model_dir(Path(args.model)):
        raise UsageError(
            f"--model {args.model} is not a model directory (needs config.json and *.safetensors)"
        )


async def _up(args: argparse.Namespace, stop: asyncio.Event) -> int:
    import msgspec

    from services.cli.ops import forget_state_dir, record_state_dir
    from services.cli.stack import StackOptions, plan, ports, worker_grace
    from services.cli.supervisor import print_prefixed, supervise
    from services.common.ports import claim, release

    await _check_up(args)
    admin_token = _admin_token(args, dict(os.environ))
    # Only the registry gets it, in its environment (stack.plan), never in an argv.
    os.environ.pop("SWITCHBOARD_ADMIN_TOKEN", None)
    opts = StackOptions(
        prefix=args.prefix,
        workers=args.workers,
        routers=args.routers,
        engine=args.engine,
        model=args.model,
        registry_port=args.registry_port,
        capacity_port=args.capacity_port,
        worker_base_port=args.worker_base_port,
        router_port=args.router_port,
        admin_token=admin_token,
        worker_grace_s=worker_grace(os.environ),
        log_format=args.log_format,
    )
    # Before anything starts: one line if a port is taken. nats-server binds its own port; it
    # is held here until a moment before (supervisor._start_nats).
    embedded = [] if args.nats_url else [("127.0.0.1", args.nats_port, "--nats-port")]
    listeners = claim([*embedded, *ports(opts, os.environ)])
    state_dir = Path(args.state_dir)
    try:
        if opts.model is None and opts.engine in ("auto", "transformers"):
            from services.worker.engines.select import ensure_demo_model

            demo_dir = state_dir / "demo-model"
            print_prefixed(
                "up", f"no model configured: using the demo checkpoint on CPU ({demo_dir})"
            )
            making = asyncio.ensure_future(asyncio.to_thread(ensure_demo_model, demo_dir))
            await wait_stop_or(stop, making)
            if not making.done():
                return INTERRUPTED
            opts = msgspec.structs.replace(opts, model=str(making.result()))

        def ready() -> None:
            _announce(opts)
            record_state_dir(state_dir, os.environ)

        return await supervise(
            plan(opts),
            nats_url=args.nats_url,
            state_dir=state_dir,
            nats_port=args.nats_port,
            stop=stop,
            prefix=args.prefix,
            on_ready=ready,
            listeners=listeners,
        )
    finally:
        release(listeners)
        forget_state_dir(state_dir, os.environ)


def _announce(opts: Any) -> None:
    from services.cli.supervisor import print_prefixed

    url = f"http://127.0.0.1:{opts.router_port}"
    model = opts.model
    name = "sim-model" if opts.engine == "sim" else "switchboard-demo"
    if model and not model.endswith("demo-model"):
        name = Path(model).resolve().name
    print_prefixed("up", f"stack is up: OpenAI API at {url}/v1")
    print_prefixed(
        "up",
        f"try: curl -N {url}/v1/chat/completions -H 'content-type: application/json' "
        f'-d \'{{"model": "{name}", "stream": true, "max_tokens": 32, "messages": '
        f'[{{"role": "user", "content": "hi"}}]}}\'',
    )
    print_prefixed("up", f"live fleet page: {url}/dashboard")
    print_prefixed(
        "up",
        "fleet table: .venv/bin/switchboard status; the bus: .venv/bin/switchboard tail; "
        "Ctrl-C stops everything",
    )


async def _nats(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.cli.natsd import NatsServer

    server = NatsServer(Path(args.state_dir) / "nats", port=args.port, on_line=print)
    url = server.start()  # main thread: see services/cli/child.py
    print(f"nats-server ready at {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await asyncio.to_thread(server.stop)
    return 0


def _target(args: argparse.Namespace) -> Any:
    from services.cli.ops import find_nats

    return find_nats(args.nats_url, args.state_dir, os.environ)


async def _tail(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.cli.tail import Filters, tail

    pattern = args.pattern or Subjects.for_prefix(args.prefix).all
    filters = Filters(worker=args.worker, model=args.model, type=args.type)
    await tail(
        _target(args),
        pattern,
        filters=filters,
        raw_json=args.json,
        stop=stop,
        timeout_s=args.timeout,
    )
    return 0


async def _make_demo(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.worker.engines.demo_model import make_demo_model

    path = await asyncio.to_thread(make_demo_model, Path(args.directory), seed=args.seed)
    print(f"demo checkpoint written to {path}")
    return 0


async def _nats_config(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.cli.natsauth import render_config

    print(COMPOSE_CONFIG_HEADER + render_config(args.prefix))
    return 0


COMPOSE_CONFIG_HEADER = (
    "# nats-server users for docker-compose, one per service role and one per worker service\n"
    "# (its replicas share it), with least-privilege subject permissions. Written by\n"
    "# `switchboard nats-config`; passwords come from the server's environment\n"
    "# (`switchboard compose-env` writes them to .env).\n"
)


async def _compose_env(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.cli.ops import ComposeEnvExists, write_compose_env

    try:
        written = write_compose_env(Path(args.output), force=args.force)
    except ComposeEnvExists as exc:
        print(f"switchboard compose-env: {exc} exists (--force replaces it)", file=sys.stderr)
        return 2
    print(
        f"wrote {written} (mode 0600): the registry admin token, the router API key "
        "(ROUTER_API_KEYS) and one NATS password per role"
    )
    return 0


async def _status(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.cli.ops import status

    print(await status(_target(args), args.prefix, args.timeout))
    return 0


async def _drain(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.cli.ops import drain

    print(await drain(_target(args), args.prefix, args.worker_id, args.timeout, undo=args.undo))
    return 0


HANDLERS: dict[str, Handler] = {
    "up": _up,
    "nats": _nats,
    "tail": _tail,
    "make-demo-model": _make_demo,
    "status": _status,
    "drain": _drain,
    "nats-config": _nats_config,
    "compose-env": _compose_env,
}
# These stop themselves in order on Ctrl-C; any other command is cancelled (tail ends itself
# and gets a moment to close its connection first).
SELF_STOPPING = {"up", "nats"}
GRACE_S = {"tail": 2.0}


async def _dispatch(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    install_stop_signals(stop)
    task = asyncio.ensure_future(HANDLERS[args.command](args, stop))
    if args.command in SELF_STOPPING:
        return await task
    await wait_stop_or(stop, task)  # re-raises what the command raised
    if not task.done():
        await asyncio.wait({task}, timeout=GRACE_S.get(args.command, 0.0))
    if task.done():
        return task.result()
    await cancel_and_wait(task)
    return INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_dispatch(args))
    except UsageError as exc:
        print(f"switchboard {args.command}: {exc}", file=sys.stderr)
        return 2
    except SubjectError as exc:
        print(f"switchboard {args.command}: {exc}", file=sys.stderr)
        return 2
    except ServiceError as exc:
        print(f"switchboard {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before our own handler was in place
        return INTERRUPTED
    finally:
        _quiet_broken_pipe()


def _quiet_broken_pipe() -> None:
    """After a pipe reader left, make the interpreter's final flush of stdout a no-op."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
