"""The `switchboard` command: up, nats, tail, status, drain, and deployment helpers."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from schemas.subjects import SubjectError, Subjects
from services.cli.args import UsageError, admin_token, build_parser
from services.common.errors import ServiceError
from services.common.run import cancel_and_wait, install_stop_signals, wait_stop_or

Handler = Callable[[argparse.Namespace, asyncio.Event], Awaitable[int]]
INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C


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

    from services.cli.child import print_prefixed
    from services.cli.ops import forget_state_dir, record_state_dir
    from services.cli.stack import StackOptions, plan, ports, worker_grace
    from services.cli.supervisor import supervise
    from services.common.ports import claim, release

    await _check_up(args)
    token = admin_token(args, dict(os.environ))
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
        admin_token=token,
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
    from services.cli.child import print_prefixed

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
    args = build_parser().parse_args(argv)
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
