"""docker-compose.yml checked statically (no Docker engine here): it parses, every command is a
real entry point, every env var is a real config field with a valid value, ports line up."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from services.common.config import SHARED_ENV, env_name

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
APP_SERVICES = {name: spec for name, spec in COMPOSE["services"].items() if name != "nats"}


def module_of(spec: dict[str, Any]) -> str:
    command = spec["command"]
    assert command[:2] == ["python", "-m"], command
    assert command[2].startswith("services."), command
    return str(command[2].split(".", 1)[1])


def test_every_app_service_runs_a_real_entry_point() -> None:
    assert set(APP_SERVICES) >= {"registry", "capacity", "worker-cpu", "worker-gpu", "router"}
    for spec in APP_SERVICES.values():
        assert (ROOT / "services" / module_of(spec) / "__main__.py").is_file()


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_env_names_are_config_fields_with_valid_values(name: str) -> None:
    spec = APP_SERVICES[name]
    service = module_of(spec)
    config = importlib.import_module(f"services.{service}.config")
    config_cls = next(
        v for k, v in vars(config).items() if k.endswith("Config") and k != "ServiceConfig"
    )
    known = {env_name(service, f.name) for f in msgspec.structs.fields(config_cls)}
    environment = {k: str(v) for k, v in spec["environment"].items()}
    unknown = set(environment) - known - set(SHARED_ENV.values())
    assert unknown == set(), f"{name}: env vars no config field reads: {unknown}"
    # ${VAR:?message} and ${VAR:-default} are filled by compose; use a stand-in value here.
    filled = {k: re.sub(r"\$\{[^}]+\}", "compose-value", v) for k, v in environment.items()}
    config.load([], filled)  # raises ConfigError naming the field on a bad value


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_ports_and_healthchecks_line_up(name: str) -> None:
    spec = APP_SERVICES[name]
    service = module_of(spec)
    port = spec["environment"][f"{service.upper()}_HTTP_PORT"]
    assert f"127.0.0.1:{port}/healthz" in " ".join(spec["healthcheck"]["test"])
    for mapping in spec.get("ports", []):
        assert mapping.split(":")[-1] == port
    assert spec["environment"][f"{service.upper()}_HTTP_HOST"] == "0.0.0.0"


def test_nats_has_jetstream_on_a_volume_and_a_healthcheck() -> None:
    nats = COMPOSE["services"]["nats"]
    assert "-js" in nats["command"]
    assert any(v.endswith(":/data") for v in nats["volumes"])
    assert "healthcheck" in nats


def test_gpu_worker_is_a_profile_with_a_device_reservation() -> None:
    gpu = COMPOSE["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["environment"]["WORKER_ENGINE"] == "exllamav2"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
