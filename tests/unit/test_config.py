"""Config loading: env, flags, precedence, and startup errors that name the field."""

from __future__ import annotations

from typing import Annotated

import msgspec
import pytest

from services.common.config import ServiceConfig, load_config
from services.common.errors import ConfigError


class DemoConfig(ServiceConfig, frozen=True, kw_only=True):
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8000
    ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 3.0
    models: tuple[str, ...] = ()
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    debug: bool = False
    token: str | None = None


def test_defaults() -> None:
    cfg = load_config(DemoConfig, "demo", [], {})
    assert cfg == DemoConfig()
    assert cfg.subject_prefix == "fleet"


def test_env_then_flags_win() -> None:
    env = {
        "DEMO_PORT": "9000",
        "DEMO_TTL_S": "1.5",
        "DEMO_MODELS": "a, b",
        "DEMO_LABELS": "zone=eu,gpu=h100",
        "DEMO_DEBUG": "true",
        "NATS_URL": "nats://10.0.0.1:4222",
        "SUBJECT_PREFIX": "prod.fleet",
        "LOG_FORMAT": "text",
    }
    cfg = load_config(DemoConfig, "demo", ["--port", "9001"], env)
    assert cfg.port == 9001
    assert cfg.ttl_s == 1.5
    assert cfg.models == ("a", "b")
    assert cfg.labels == {"zone": "eu", "gpu": "h100"}
    assert cfg.debug is True
    assert cfg.nats_url == "nats://10.0.0.1:4222"
    assert cfg.subject_prefix == "prod.fleet"
    assert cfg.log_format == "text"
    assert load_config(DemoConfig, "demo", ["--subject-prefix", "x"], env).subject_prefix == "x"


@pytest.mark.parametrize(
    ("argv", "env", "field"),
    [
        ([], {"DEMO_PORT": "0"}, "port"),
        ([], {"DEMO_PORT": "99999"}, "port"),
        (["--port", "eighty"], {}, "port"),
        ([], {"DEMO_TTL_S": "-1"}, "ttl_s"),
        ([], {"LOG_LEVEL": "loud"}, "log_level"),
        ([], {"LOG_FORMAT": "xml"}, "log_format"),
    ],
)
def test_out_of_range_fails_naming_the_field(
    argv: list[str], env: dict[str, str], field: str
) -> None:
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        load_config(DemoConfig, "demo", argv, env)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"SUBJECT_PREFIX": "fleet.*"}, "subject prefix"),
        ({"SUBJECT_PREFIX": "$SYS"}, "subject prefix"),
        ({"NATS_URL": "http://localhost:4222"}, "nats_url"),
    ],
)
def test_cross_checks_fail_naming_the_field(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(DemoConfig, "demo", [], env)


def test_empty_optional_means_none() -> None:
    assert load_config(DemoConfig, "demo", [], {"DEMO_TOKEN": ""}).token is None
    assert load_config(DemoConfig, "demo", [], {"DEMO_TOKEN": "s3cret"}).token == "s3cret"


def test_http_limits_come_from_each_services_config() -> None:
    from services.common.http_limits import HttpLimits
    from services.router import config as router_config

    env = {
        "ROUTER_HTTP_HEADER_TIMEOUT_S": "2.5",
        "ROUTER_HTTP_BODY_IDLE_TIMEOUT_S": "7",
        "ROUTER_HTTP_MAX_CONNECTIONS": "100",
        "ROUTER_HTTP_MAX_HEAD_BYTES": "8192",
    }
    limits = HttpLimits.of(router_config.load([], env))
    assert limits == HttpLimits(
        header_timeout_s=2.5, body_idle_timeout_s=7.0, max_connections=100, max_head_bytes=8192
    )
    with pytest.raises(ConfigError, match="http_max_connections"):
        router_config.load([], {"ROUTER_HTTP_MAX_CONNECTIONS": "0"})
