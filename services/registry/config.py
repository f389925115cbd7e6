"""Registry config: admin HTTP bind and token, heartbeat TTL, beacon interval, KV bucket."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Annotated

import msgspec

from services.common.config import Port, ServiceConfig, load_config

PositiveSeconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RegistryConfig(ServiceConfig, frozen=True, kw_only=True):
    http_host: str = "127.0.0.1"
    http_port: Port = 8081
    # Bearer token for the admin API; may be empty only when http_host is loopback (development).
    admin_token: str = ""
    heartbeat_ttl_s: PositiveSeconds = 3.0
    beacon_interval_s: PositiveSeconds = 1.0
    kv_bucket: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+$")] = "registry"
    # Copies of the KV bucket on a NATS cluster (3 survives losing a node); used at creation.
    kv_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    request_body_limit: Annotated[int, msgspec.Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.admin_token and not is_loopback(self.http_host):
            raise ValueError(
                f"admin_token (REGISTRY_ADMIN_TOKEN) is required when http_host "
                f"({self.http_host}) is not a loopback address"
            )


def load(argv: Sequence[str], environ: Mapping[str, str]) -> RegistryConfig:
    return load_config(RegistryConfig, "registry", argv, environ)
