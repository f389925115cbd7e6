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


def plan(opts: StackOptions) -> list[ServiceSpec]:
    """Services in health-gated start order: registry, capacity, workers, router.

    Each issue adds its service here as it lands; today the stack is NATS alone.
    """
    return []
