"""The `switchboard` command line: help for every flag, --version, one-line flag errors."""

from __future__ import annotations

import argparse

import pytest

from services.cli import main as cli
from services.cli.args import build_parser
from services.cli.stack import passthrough_env


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_of_every_subcommand_has_help() -> None:
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, sub in subcommands().items()
        for action in sub._actions
        if not action.help
    ]
    assert not missing, missing
    assert set(subcommands()) == set(cli.HANDLERS)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("switchboard 0.")


def test_a_bad_flag_value_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["up", "--workers", "-1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "switchboard up: argument --workers: '-1' is not a whole number >= 0 "
        "(see switchboard up --help)\n"
    )


def test_up_help_lists_the_environment_handed_to_the_services() -> None:
    text = subcommands()["up"].format_help()
    for name in ("LOG_LEVEL", "REGISTRY_HEARTBEAT_TTL_S", "WORKER_HEARTBEAT_INTERVAL_S"):
        assert name in text
    handed_on = {name for names in passthrough_env().values() for name in names}
    assert {"ROUTER_API_KEYS", "CAPACITY_OVERRIDE", "ROUTER_HTTP_HOST"} <= handed_on
    # `up` sets these itself: listing them as settable would mislead.
    set_by_up = {"NATS_URL", "SUBJECT_PREFIX", "LOG_FORMAT", "REGISTRY_ADMIN_TOKEN"}
    set_by_up |= {"WORKER_HTTP_PORT", "WORKER_ENGINE", "WORKER_MODEL_DIR", "REGISTRY_HTTP_HOST"}
    set_by_up |= {"ROUTER_CAPACITY_SHARE", "ROUTER_REUSE_PORT", "SWITCHBOARD_INSTANCE"}
    set_by_up |= {"SWITCHBOARD_LISTEN_FD"}
    assert not handed_on & set_by_up
