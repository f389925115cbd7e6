"""The compose stack for real, when a Docker engine is present (never on our dev/CI machines)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def docker_engine() -> str | None:
    """None when an engine answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    return None if probe.returncode == 0 else "no Docker engine is running (docker info failed)"


@pytest.mark.e2e
def test_compose_stack_serves_a_chat_completion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    why = docker_engine()
    if why is not None:
        pytest.skip(
            f"compose e2e needs a Docker engine: {why}; the file is checked statically "
            "by tests/unit/test_compose.py"
        )
    import json
    import urllib.request

    from testcontainers.compose import DockerCompose

    from services.cli.ops import write_compose_env

    secrets = write_compose_env(tmp_path / ".env")
    for line in secrets.read_text().splitlines():  # what `switchboard compose-env` gives a user
        if not line.startswith("#"):
            name, value = line.split("=", 1)
            monkeypatch.setenv(name, value)
    key = os.environ["ROUTER_API_KEYS"].split(",")[0]
    with DockerCompose(str(ROOT), wait=True) as compose:
        compose.wait_for("http://127.0.0.1:8080/readyz")
        dashboard = f"http://127.0.0.1:8080/dashboard?key={key}"
        with urllib.request.urlopen(dashboard, timeout=10) as page:
            assert b"Switchboard fleet" in page.read()
        request = urllib.request.Request(
            "http://127.0.0.1:8080/v1/chat/completions",
            data=json.dumps(
                {
                    "model": "switchboard-demo",
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": "hi"}],
                }
            ).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert json.load(resp)["usage"]["completion_tokens"] >= 1
