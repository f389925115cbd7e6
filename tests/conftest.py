"""Fixtures: a real nats-server per session (or NATS_URL), a random subject prefix per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.cli.natsd import NatsServer
from services.common.bus import Bus


@pytest.fixture(scope="session", autouse=True)
def private_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`switchboard up` records itself under XDG_STATE_HOME: keep every test's record in tmp."""
    saved = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield
    if saved is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = saved


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real nats-server with JetStream on a free loopback port; NATS_URL overrides it."""
    external = os.environ.get("NATS_URL")
    if external:
        yield external
        return
    server = NatsServer(tmp_path_factory.mktemp("nats") / "data", port=-1)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    """A fresh subject prefix so tests sharing one server never see each other's messages."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_url, "test")
    try:
        yield b
    finally:
        await b.close()


def _cuda_ready() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import exllamav2  # noqa: F401
    except ImportError as exc:
        return False, f"exllamav2 does not import: {exc}"
    return True, ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the marker, not keywords: a parameter id such as "gpu" must not make a test a GPU test
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    ok, why = _cuda_ready()
    if ok:
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=f"gpu test skipped: {why}"))


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint (random fp16 Llama + trained BPE tokenizer), built once per session."""
    from services.worker.engines.demo_model import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture
async def hf_worker(nats_url: str, prefix: str, demo_dir: Path) -> AsyncIterator[Any]:
    """An unregistered transformers worker serving the demo checkpoint as model "demo"."""
    from tests.integration.fleet_fixtures import running_worker

    async with running_worker(
        nats_url,
        prefix,
        register=False,
        engine="transformers",
        model_dir=str(demo_dir),
        models=("demo",),
    ) as w:
        yield w
