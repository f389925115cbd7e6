"""The status table; where operator commands find the NATS of the running `up`."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.capacity import CapacitySource, CapacityView, ModelCapacity
from schemas.load import ModelLoad, WorkerLoad
from schemas.registry import RegistrySnapshot, WorkerRecord, WorkerStatus
from services.cli.ops import (
    DEFAULT_NATS_URL,
    NatsTarget,
    OperatorError,
    find_nats,
    forget_state_dir,
    pointer_file,
    record_state_dir,
    render_status,
)


def test_render_status() -> None:
    a = WorkerRecord(
        id="w-a", url="http://a:1", models=("llama", "qwen"), status=WorkerStatus.READY, revision=2
    )
    b = WorkerRecord(
        id="w-b", url="http://b:1", models=("llama",), status=WorkerStatus.NOT_READY, revision=3
    )
    load = WorkerLoad(
        worker_id="w-a",
        url="http://a:1",
        status=WorkerStatus.READY,
        models=(
            ModelLoad(id="llama", in_flight=3, queue_depth=1, max_in_flight=8, max_queue_depth=16),
        ),
    )
    cap = CapacityView(
        fleet=ModelCapacity(capacity=64, source=CapacitySource.MIXED, workers_available=1),
        models={
            "llama": ModelCapacity(capacity=64, source=CapacitySource.MIXED, workers_available=1)
        },
    )
    text = render_status(
        RegistrySnapshot(epoch=7, seq=42, workers=(a, b)), {"w-a": (100.0, load)}, cap, 101.5
    )
    lines = text.splitlines()
    assert lines[0].split() == [
        "WORKER",
        "STATUS",
        "URL",
        "MODEL",
        "IN_FLIGHT",
        "QUEUE",
        "HEARTBEAT",
    ]
    assert lines[1].split() == ["w-a", "ready", "http://a:1", "llama", "3/8", "1/16", "1.5s", "ago"]
    assert lines[2].split() == ["qwen", "?", "?"]  # served, but no load reported for it
    assert lines[3].split() == ["w-b", "not_ready", "http://b:1", "llama", "?", "?", "never"]
    assert "registry epoch 7 seq 42, 2 workers" in text
    assert "capacity: fleet 64 (mixed, 1 healthy)" in text
    assert "  llama: 64 (mixed, 1 healthy)" in text
    unknown = render_status(RegistrySnapshot(epoch=1, seq=0, workers=()), {}, None, 0.0)
    assert "capacity: unknown" in unknown
    # a dead worker sends nothing while status listens: its age is the registry's last heartbeat
    snap = RegistrySnapshot(epoch=7, seq=42, workers=(a, b), heard_at={"w-b": 60.0, "w-a": 1.0})
    lines = render_status(snap, {"w-a": (100.0, load)}, cap, 101.5).splitlines()
    assert lines[1].split()[-2:] == ["1.5s", "ago"]  # what status itself heard wins
    assert lines[3].split()[-2:] == ["41.5s", "ago"]


def saved(state_dir: Path, url: str) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "operator-url").write_text(url + "\n")
    return state_dir


def test_find_nats_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--nats-url, --state-dir, NATS_URL, SWITCHBOARD_STATE_DIR, the last up, ./.switchboard."""
    monkeypatch.chdir(tmp_path)
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    assert find_nats(None, None, env) == NatsTarget(
        DEFAULT_NATS_URL, "the default: no running `switchboard up` found"
    )
    saved(tmp_path / ".switchboard", "nats://cwd:1")
    assert find_nats(None, None, env).url == "nats://cwd:1"
    last = saved(tmp_path / "last", "nats://last:1")
    record_state_dir(last, env)
    assert find_nats(None, None, env) == NatsTarget(
        "nats://last:1", f"credentials from {last / 'operator-url'}"
    )
    env["SWITCHBOARD_STATE_DIR"] = str(saved(tmp_path / "env-dir", "nats://envdir:1"))
    assert find_nats(None, None, env).url == "nats://envdir:1"
    env["NATS_URL"] = "nats://env:1"
    assert find_nats(None, None, env) == NatsTarget("nats://env:1", "from NATS_URL")
    flag_dir = saved(tmp_path / "flag-dir", "nats://flagdir:1")
    assert find_nats(None, str(flag_dir), env).url == "nats://flagdir:1"
    assert find_nats("nats://flag:1", str(flag_dir), env) == NatsTarget(
        "nats://flag:1", "from --nats-url"
    )


def test_a_state_dir_without_credentials_says_so(tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match=r"is `switchboard up --state-dir .*` running\?"):
        find_nats(None, str(tmp_path / "empty"), {})


def test_the_record_of_the_last_up_is_forgotten_only_by_that_up(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    pointer = record_state_dir(tmp_path / "a", env)
    assert pointer == tmp_path / "xdg" / "switchboard" / "last-up"
    record_state_dir(tmp_path / "b", env)  # a second `up` started later
    forget_state_dir(tmp_path / "a", env)  # the first one stops
    assert pointer.read_text().strip() == str(tmp_path / "b")
    forget_state_dir(tmp_path / "b", env)
    assert not pointer.exists()
    assert pointer_file({"HOME": "/home/u"}) == Path("/home/u/.local/state/switchboard/last-up")
