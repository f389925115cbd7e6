"""docker-compose.yml checked statically (no Docker engine here): it parses, every command is a
real entry point, every env var is a real config field with a valid value, ports line up."""

from __future__ import annotations

import importlib
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from services import cli
from services.common import natsauth
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
    args = gpu["build"]["args"]
    # exllamav2's extension is compiled with nvcc on first import: only -devel images have it
    assert args["EXTRAS"] == "gpu"
    assert args["BASE"].endswith("-devel"), args["BASE"]
    flash_attn = tuple(int(part) for part in args["FLASH_ATTN"].split(".")[:3])
    assert flash_attn >= (2, 5, 7)  # paged mode (continuous batching) needs it
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert all(f"ARG {name}" in dockerfile for name in args)
    # the compiled extension outlives the container, in a directory the image's user owns
    cache = "/home/switchboard/.cache/torch_extensions"
    assert f"exl2-extension:{cache}" in gpu["volumes"]
    assert "exl2-extension" in COMPOSE["volumes"]
    assert dockerfile.index("USER switchboard") < dockerfile.index(f"mkdir -p {cache}")


ROLE_OF = {"registry": "registry", "capacity": "capacity", "worker": "worker", "router": "router"}


def test_every_service_connects_to_nats_as_its_own_role() -> None:
    for name, spec in APP_SERVICES.items():
        role = ROLE_OF[module_of(spec)]
        url = spec["environment"]["NATS_URL"]
        match = re.fullmatch(r"nats://(\w+):\$\{(\w+):\?[^}]+\}@nats:4222", url)
        assert match is not None, f"{name}: NATS_URL {url!r} carries no credentials"
        assert match.groups() == (role, natsauth.password_env(role)), name


def test_nats_loads_the_committed_users_with_every_password_from_env() -> None:
    nats = COMPOSE["services"]["nats"]
    command = nats["command"]
    conf = command[command.index("-c") + 1]
    assert f"./deploy/nats.conf:{conf}:ro" in nats["volumes"]
    assert set(nats["environment"]) == {natsauth.password_env(r) for r in natsauth.ROLES}
    for value in nats["environment"].values():
        assert value.startswith("${")
        assert ":?" in value  # compose refuses to start without it


def test_committed_nats_config_is_what_nats_config_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix = COMPOSE["x-service"]["environment"]["SUBJECT_PREFIX"]
    assert cli.main(["nats-config", "--prefix", prefix]) == 0
    committed = (ROOT / "deploy" / "nats.conf").read_text()
    assert committed == capsys.readouterr().out, "regenerate: switchboard nats-config > deploy/..."
    assert "password" in committed
    assert "pw-" not in committed  # no literal secret in a committed file
    assert committed.count("$NATS_") == len(natsauth.ROLES)


def test_compose_env_writes_every_secret_compose_requires(tmp_path: Path) -> None:
    out = tmp_path / ".env"
    assert cli.main(["compose-env", "--output", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600
    written = dict(
        line.split("=", 1) for line in out.read_text().splitlines() if not line.startswith("#")
    )
    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.yml").read_text()))
    assert required <= set(written)
    assert all(len(v) >= 20 for v in written.values())
    assert cli.main(["compose-env", "--output", str(out)]) == 2  # never clobbers silently
    assert cli.main(["compose-env", "--output", str(out), "--force"]) == 0


def test_cpu_image_installs_the_pinned_cpu_torch_first() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    cpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["cpu"]
    pin = next(req for req in cpu_extra if req.startswith("torch"))
    assert pin.startswith("torch=="), "the cpu extra must pin torch exactly for the image"
    step = re.search(r'--index-url "\$TORCH_CPU_INDEX" \\\s*"\$\((.+)\)"', dockerfile)
    assert step is not None, "the CPU torch step is missing from the Dockerfile"
    # the shell the image runs picks exactly the cpu extra's pin (not the gpu extra's torch>=)
    found = subprocess.run(
        ["sh", "-c", step.group(1)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert found == pin
    assert "download.pytorch.org/whl/cpu" in dockerfile
    assert dockerfile.index("$TORCH_CPU_INDEX") < dockerfile.index('pip install ".[${EXTRAS}]"')
