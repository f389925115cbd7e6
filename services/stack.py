"""What `switchboard up` runs: the ordered list of service processes for the given options."""

from __future__ import annotations

import msgspec

from services.supervisor import ServiceSpec


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
        on_exit="restart",  # its state is in JetStream KV; a new process picks it up
    )
    capacity = ServiceSpec(
        name="capacity",
        module="services.capacity",
        args=("--http-port", str(opts.capacity_port)),
        env=env,
        health_url=f"http://127.0.0.1:{opts.capacity_port}/healthz",
        role="capacity",
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
            on_exit="restart",
        )
        for i in range(opts.routers)
    ]
    return [registry, capacity, *workers, *routers]


def worker_args(opts: StackOptions, port: int) -> tuple[str, ...]:
    args = ["--http-port", str(port), "--engine", opts.engine]
    if opts.model:
        args += ["--model-dir", opts.model]
    return tuple(args)
