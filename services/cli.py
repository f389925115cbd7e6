"""The `switchboard` command: up, nats, tail, status, drain, and deployment helpers."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from schemas.subjects import SubjectError, Subjects
from services.common.run import install_stop_signals


def default_nats_url() -> str:
    """NATS_URL, else the operator credentials `switchboard up` wrote, else the local default."""
    if os.environ.get("NATS_URL"):
        return os.environ["NATS_URL"]
    saved = Path(".switchboard") / "operator-url"
    if saved.is_file():
        return saved.read_text().strip()
    return "nats://127.0.0.1:4222"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchboard", description="LLM inference fleet gateway")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole stack on this machine (embedded NATS)")
    up.add_argument("--workers", type=int, default=2, help="number of workers (default 2)")
    up.add_argument("--routers", type=int, default=1, help="router processes (default 1)")
    up.add_argument(
        "--engine", default="auto", choices=["auto", "exllamav2", "transformers", "sim"]
    )
    up.add_argument("--model", default=None, help="model directory for real engines")
    up.add_argument("--nats-url", default=os.environ.get("NATS_URL"), help="use this NATS instead")
    up.add_argument("--nats-port", type=int, default=4222, help="embedded NATS port (default 4222)")
    up.add_argument(
        "--state-dir", default=".switchboard", help="JetStream data and generated files"
    )
    up.add_argument("--prefix", default=os.environ.get("SUBJECT_PREFIX", "fleet"))
    up.add_argument("--registry-port", type=int, default=8081, help="registry admin API port")
    up.add_argument("--capacity-port", type=int, default=8082, help="capacity /metrics port")
    up.add_argument("--worker-base-port", type=int, default=8100, help="first worker's port")
    up.add_argument("--router-port", type=int, default=8080, help="the ingress port")
    up.add_argument(
        "--admin-token",
        default=os.environ.get("SWITCHBOARD_ADMIN_TOKEN", ""),
        help="registry admin bearer token (empty: open on loopback only)",
    )
    up.add_argument("--log-format", default="text", choices=["text", "json"])

    nats = sub.add_parser("nats", help="run only the embedded nats-server with JetStream")
    nats.add_argument("--port", type=int, default=4222)
    nats.add_argument("--state-dir", default=".switchboard")

    demo = sub.add_parser("make-demo-model", help="write a tiny random-weight Llama checkpoint")
    demo.add_argument("directory", help="where to write it (created)")
    demo.add_argument("--seed", type=int, default=0)

    conf = sub.add_parser(
        "nats-config", help="print nats-server config: one user per service role (deploy/)"
    )
    conf.add_argument("--prefix", default=os.environ.get("SUBJECT_PREFIX", "fleet"))

    cenv = sub.add_parser("compose-env", help="write .env with fresh credentials for compose")
    cenv.add_argument("--output", default=".env", help="file to write (default .env)")
    cenv.add_argument("--force", action="store_true", help="replace an existing file")

    status = sub.add_parser("status", help="one table: workers, load, heartbeat age, capacity")
    status.add_argument("--nats-url", default=default_nats_url())
    status.add_argument("--prefix", default=os.environ.get("SUBJECT_PREFIX", "fleet"))

    drain = sub.add_parser("drain", help="stop routing new requests to a worker (--undo: resume)")
    drain.add_argument("worker_id")
    drain.add_argument("--undo", action="store_true", help="set the worker Ready again")
    drain.add_argument("--nats-url", default=default_nats_url())
    drain.add_argument("--prefix", default=os.environ.get("SUBJECT_PREFIX", "fleet"))

    tail = sub.add_parser("tail", help="print bus messages, one line each, marking seq gaps")
    tail.add_argument(
        "pattern", nargs="?", default=None, help="subject pattern (default <prefix>.>)"
    )
    tail.add_argument("--nats-url", default=default_nats_url())
    tail.add_argument("--prefix", default=os.environ.get("SUBJECT_PREFIX", "fleet"))
    tail.add_argument("--json", action="store_true", help="print raw JSON payloads")
    tail.add_argument("--worker", default=None, help="only messages about this worker id")
    tail.add_argument("--model", default=None, help="only messages mentioning this model")
    tail.add_argument("--type", default=None, help="only this message type (prefix match)")
    return p


async def _up(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.stack import StackOptions, plan
    from services.supervisor import print_prefixed, supervise

    model = args.model
    if model is None and args.engine in ("auto", "transformers"):
        from services.worker.engines import ensure_demo_model

        demo_dir = Path(args.state_dir) / "demo-model"
        print_prefixed("up", f"no model configured: using the demo checkpoint on CPU ({demo_dir})")
        model = str(await asyncio.to_thread(ensure_demo_model, demo_dir))
    opts = StackOptions(
        prefix=args.prefix,
        workers=args.workers,
        routers=args.routers,
        engine=args.engine,
        model=model,
        registry_port=args.registry_port,
        capacity_port=args.capacity_port,
        worker_base_port=args.worker_base_port,
        router_port=args.router_port,
        admin_token=args.admin_token,
        log_format=args.log_format,
    )

    def ready() -> None:
        url = f"http://127.0.0.1:{opts.router_port}"
        name = "sim-model" if opts.engine == "sim" else "switchboard-demo"
        if model and not model.endswith("demo-model"):
            name = Path(model).resolve().name
        print_prefixed("up", f"stack is up: OpenAI API at {url}/v1")
        print_prefixed(
            "up",
            f"try: curl -N {url}/v1/chat/completions -H 'content-type: application/json' "
            f'-d \'{{"model": "{name}", "stream": true, "messages": '
            f'[{{"role": "user", "content": "hi"}}]}}\'',
        )
        print_prefixed("up", f"live fleet page: {url}/dashboard")
        print_prefixed(
            "up",
            "fleet table: .venv/bin/switchboard status; the bus: .venv/bin/switchboard tail; "
            "Ctrl-C stops everything",
        )

    return await supervise(
        plan(opts),
        nats_url=args.nats_url,
        state_dir=Path(args.state_dir),
        nats_port=args.nats_port,
        stop=stop,
        prefix=args.prefix,
        on_ready=ready,
    )


async def _nats(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.common.natsd import NatsServer

    server = NatsServer(Path(args.state_dir) / "nats", port=args.port, on_line=print)
    url = server.start()  # main thread: see services/common/child.py
    print(f"nats-server ready at {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await asyncio.to_thread(server.stop)
    return 0


async def _tail(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.tail import Filters, tail

    pattern = args.pattern or Subjects.for_prefix(args.prefix).all
    filters = Filters(worker=args.worker, model=args.model, type=args.type)
    await tail(args.nats_url, pattern, filters=filters, raw_json=args.json, stop=stop)
    return 0


async def _make_demo(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.worker.demo_model import make_demo_model

    path = await asyncio.to_thread(make_demo_model, Path(args.directory), seed=args.seed)
    print(f"demo checkpoint written to {path}")
    return 0


async def _nats_config(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.common.natsauth import render_config

    print(COMPOSE_CONFIG_HEADER + render_config(args.prefix))
    return 0


COMPOSE_CONFIG_HEADER = (
    "# nats-server users for docker-compose, one per service role, with least-privilege\n"
    "# subject permissions. Written by `switchboard nats-config`; passwords come from the\n"
    "# server's environment (`switchboard compose-env` writes them to .env).\n"
)


async def _compose_env(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.ops import ComposeEnvExists, write_compose_env

    try:
        written = write_compose_env(Path(args.output), force=args.force)
    except ComposeEnvExists as exc:
        print(f"switchboard compose-env: {exc} exists (--force replaces it)", file=sys.stderr)
        return 2
    print(f"wrote {written} (mode 0600): the registry admin token and one NATS password per role")
    return 0


async def _status(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.ops import status

    print(await status(args.nats_url, args.prefix))
    return 0


async def _drain(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from services.ops import drain

    print(await drain(args.nats_url, args.prefix, args.worker_id, undo=args.undo))
    return 0


async def _dispatch(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    install_stop_signals(stop)
    handlers = {
        "up": _up,
        "nats": _nats,
        "tail": _tail,
        "make-demo-model": _make_demo,
        "status": _status,
        "drain": _drain,
        "nats-config": _nats_config,
        "compose-env": _compose_env,
    }
    return await handlers[args.command](args, stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_dispatch(args))
    except SubjectError as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return 2
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
