"""What `switchboard up` runs: the ordered list of service processes for the given options."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from services.cli.child import ServiceSpec


class StackOptions(msgspec.Struct, frozen=True, kw_only=True):
    prefix: str = "fleet"
    workers: int = 2
    routers: int = 1
    engine: str = "auto"
    model: str | None = None
    registry_port: int = 8081
    capacity_port: int = 8082
    router_port: int = 8080
    worker_base_port: int = 8100
    admin_token: str = ""
    log_format: str = "text"
    worker_grace_s: float = 35.0  # see worker_grace


def _common_env(opts: StackOptions) -> dict[str, str]:
    return {"SUBJECT_PREFIX": opts.prefix, "LOG_FORMAT": opts.log_format}


def plan(opts: StackOptions) -> list[ServiceSpec]:
    """Services in health-gated start order: registry, capacity, workers, router.

    Each service joins this list when its issue lands.
    """
    env = _common_env(opts)
    registry = ServiceSpec(
        name="registry",
        module="services.registry",
        args=("--http-port", str(opts.registry_port), "--http-host", "127.0.0.1"),
        env={**env, "REGISTRY_ADMIN_TOKEN": opts.admin_token},
        health_url=f"http://127.0.0.1:{opts.registry_port}/healthz",
        role="registry",
        listen_port=opts.registry_port,
        on_exit="restart",  # its state is in JetStream KV; a new process picks it up
    )
    capacity = ServiceSpec(
        name="capacity",
        module="services.capacity",
        args=("--http-port", str(opts.capacity_port)),
        env=env,
        health_url=f"http://127.0.0.1:{opts.capacity_port}/healthz",
        role="capacity",
        listen_port=opts.capacity_port,
        on_exit="restart",
    )
    workers = [
        ServiceSpec(
            name=f"worker-{i + 1}",
            module="services.worker",
            args=worker_args(opts, opts.worker_base_port + i),
            env=env,
            health_url=f"http://127.0.0.1:{opts.worker_base_port + i}/healthz",
            on_exit="report",
            role="worker",
            grace_s=opts.worker_grace_s,
            listen_port=opts.worker_base_port + i,
        )
        for i in range(opts.workers)
    ]
    routers = [
        ServiceSpec(
            name=f"router-{i + 1}" if opts.routers > 1 else "router",
            module="services.router",
            args=(
                "--http-port",
                str(opts.router_port),
                "--capacity-share",
                f"{1 / opts.routers:.6f}",
            ),
            env=env,
            health_url=f"http://127.0.0.1:{opts.router_port}/healthz",
            role="router",
            listen_port=opts.router_port,  # one socket for all routers (services/common/ports.py)
            on_exit="restart",
        )
        for i in range(opts.routers)
    ]
    return [registry, capacity, *workers, *routers]


def worker_grace(environ: Mapping[str, str]) -> float:
    """How long `up` lets a worker drain after SIGTERM: its WORKER_DRAIN_TIMEOUT_S (default 30)
    and 5 s to deregister and exit, before it is killed."""
    try:
        drain = float(environ.get("WORKER_DRAIN_TIMEOUT_S") or 30.0)
    except ValueError:
        drain = 30.0  # the worker itself refuses the value, naming it
    return max(drain, 0.0) + 5.0


def worker_args(opts: StackOptions, port: int) -> tuple[str, ...]:
    args = ["--http-port", str(port), "--engine", opts.engine]
    if opts.model:
        args += ["--model-dir", opts.model]
    return tuple(args)


def ports(opts: StackOptions, environ: Mapping[str, str]) -> list[tuple[str, int, str]]:
    """(host, port, the `up` flag that sets it) for every HTTP port the stack listens on.

    The registry is on loopback (its flags say so); the others on <SERVICE>_HTTP_HOST, as
    when they bound their own ports.
    """

    def host(service: str) -> str:
        return environ.get(f"{service.upper()}_HTTP_HOST") or "127.0.0.1"

    workers = [
        (host("worker"), opts.worker_base_port + i, f"--worker-base-port, worker-{i + 1}")
        for i in range(opts.workers)
    ]
    return [
        ("127.0.0.1", opts.registry_port, "--registry-port"),
        (host("capacity"), opts.capacity_port, "--capacity-port"),
        *workers,
        (host("router"), opts.router_port, "--router-port"),
    ]


def passthrough_env() -> dict[str, list[str]]:
    """Per service, the environment variables `up` hands on unchanged (not those it sets)."""
    from services.capacity.config import CapacityConfig
    from services.common.config import SHARED_ENV, ServiceConfig, env_name, flag_name
    from services.registry.config import RegistryConfig
    from services.router.config import RouterConfig
    from services.worker.config import WorkerConfig

    configs: dict[str, type[ServiceConfig]] = {
        "registry": RegistryConfig,
        "capacity": CapacityConfig,
        "worker": WorkerConfig,
        "router": RouterConfig,
    }
    specs = {spec.role: spec for spec in plan(StackOptions(workers=1, model="model"))}
    set_by_up = {"NATS_URL", "SWITCHBOARD_INSTANCE", "SWITCHBOARD_LISTEN_FD"}
    shared = set(SHARED_ENV.values()) - set_by_up - set(specs["registry"].env)
    found: dict[str, list[str]] = {"all services": sorted(shared)}
    for service, cls in configs.items():
        spec = specs[service]
        found[service] = [
            env_name(service, f.name)
            for f in msgspec.structs.fields(cls)
            if f.name not in SHARED_ENV
            and f.name != "reuse_port"  # `up` binds the sockets itself, without it
            and flag_name(f.name) not in spec.args
            and env_name(service, f.name) not in spec.env
        ]
    return found
