"""`up`'s admin token (never on a command line) and how long a worker may drain when stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.main import main
from services.cli.stack import StackOptions, plan, worker_grace


def test_a_token_on_the_command_line_is_refused_without_echoing_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["up", "--admin-token", "s3cret-value"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--admin-token" in err
    assert "SWITCHBOARD_ADMIN_TOKEN" in err
    assert "s3cret-value" not in err


def test_an_empty_token_file_is_one_line_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    args = ["up", "--engine", "sim", "--admin-token-file", str(empty)]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"switchboard up: --admin-token-file {empty}: the file is empty\n"
    )


def test_the_registry_gets_the_token_in_its_environment_only() -> None:
    specs = plan(StackOptions(admin_token="s3cret-value", workers=1))
    registry = specs[0]
    assert registry.env["REGISTRY_ADMIN_TOKEN"] == "s3cret-value"
    assert all("s3cret-value" not in " ".join(spec.args) for spec in specs)
    assert all("REGISTRY_ADMIN_TOKEN" not in spec.env for spec in specs[1:])


def test_a_worker_may_drain_for_its_drain_timeout_before_it_is_killed() -> None:
    assert worker_grace({}) == 35.0
    assert worker_grace({"WORKER_DRAIN_TIMEOUT_S": "120"}) == 125.0
    assert worker_grace({"WORKER_DRAIN_TIMEOUT_S": "soon"}) == 35.0
    specs = plan(StackOptions(workers=1, worker_grace_s=125.0))
    assert [s.grace_s for s in specs if s.role == "worker"] == [125.0]
