"""The transformers CPU engine with the demo checkpoint, through the worker's HTTP API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from schemas.inference import ChatMessage
from services.worker.demo_model import is_model_dir
from services.worker.template import ChatTemplate
from tests.engine_contract import MESSAGES, check_cancel_on_disconnect, check_stream_and_usage
from tests.integration.fleet_fixtures import running_worker

pytestmark = pytest.mark.integration


@pytest.fixture
async def hf_worker(nats_url: str, prefix: str, demo_dir: Path) -> AsyncIterator[Any]:
    async with running_worker(
        nats_url,
        prefix,
        register=False,
        engine="transformers",
        model_dir=str(demo_dir),
        models=("demo",),
    ) as w:
        yield w


def test_demo_checkpoint_is_complete(demo_dir: Path) -> None:
    assert is_model_dir(demo_dir)
    names = {p.name for p in demo_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


def test_jinja_template_matches_transformers(demo_dir: Path) -> None:
    """The exllamav2 path renders templates itself; it must agree with transformers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_dir), local_files_only=True)
    ours = ChatTemplate.from_model_dir(demo_dir).render([ChatMessage(**m) for m in MESSAGES])
    theirs = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours == theirs


async def test_streamed_chat_and_usage(hf_worker: Any, demo_dir: Path) -> None:
    assert hf_worker.models["demo"].engine.limits.max_batch == 1
    await check_stream_and_usage(hf_worker, "demo", demo_dir)


async def test_cancel_on_disconnect_stops_generation(hf_worker: Any) -> None:
    engine = hf_worker.models["demo"].engine
    await check_cancel_on_disconnect(hf_worker, "demo", lambda: engine.steps)


async def test_bad_model_dir_fails_at_start_naming_the_field(
    nats_url: str, prefix: str, tmp_path: Path
) -> None:
    from services.common.errors import ConfigError

    for engine in ("transformers", "auto", "exllamav2"):
        with pytest.raises(ConfigError, match="model_dir"):
            async with running_worker(
                nats_url, prefix, register=False, engine=engine, model_dir=str(tmp_path)
            ):
                pass


async def test_exllamav2_without_cuda_is_a_clear_error(
    nats_url: str, prefix: str, demo_dir: Path
) -> None:
    from services.common.errors import ConfigError
    from services.worker.engine_exl2 import cuda_ready

    if cuda_ready()[0]:
        pytest.skip("this machine has CUDA and exllamav2: tests/gpu covers that path")
    with pytest.raises(ConfigError, match="exllamav2 needs CUDA"):
        async with running_worker(
            nats_url, prefix, register=False, engine="exllamav2", model_dir=str(demo_dir)
        ):
            pass
