"""Subject building and token validation."""

from __future__ import annotations

import pytest

from schemas.subjects import SubjectError, Subjects, prefix, token


@pytest.mark.parametrize("bad", ["a.b", "*", ">", "a*", "x>", " ", "a b", "a\tb", "$x", "$SYS", ""])
def test_token_rejects_subject_breaking_strings(bad: str) -> None:
    with pytest.raises(SubjectError):
        token(bad)


@pytest.mark.parametrize("good", ["w1", "worker-7", "gpu_node_3", "A9", "x$"])
def test_token_accepts_safe_ids(good: str) -> None:
    assert token(good) == good


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a.", "a.*", "fleet.>", "$JS"])
def test_prefix_rejects_bad_prefixes(bad: str) -> None:
    with pytest.raises(SubjectError):
        prefix(bad)


def test_subjects_under_prefix() -> None:
    s = Subjects.for_prefix("prod.fleet")
    assert s.all == "prod.fleet.>"
    assert s.registry_events == "prod.fleet.registry.events"
    assert s.registry_snapshot == "prod.fleet.registry.snapshot"
    assert s.registry_cmd("register") == "prod.fleet.registry.cmd.register"
    assert s.registry_cmd_all == "prod.fleet.registry.cmd.*"
    assert s.load("w1") == "prod.fleet.load.w1"
    assert s.load_all == "prod.fleet.load.*"
    assert s.capacity_view == "prod.fleet.capacity.view"
    assert s.capacity_snapshot == "prod.fleet.capacity.snapshot"
    assert s.kv_bucket("registry") == "prod_fleet_registry"


def test_subject_builders_validate_ids() -> None:
    s = Subjects.for_prefix("fleet")
    with pytest.raises(SubjectError):
        s.load("w.1")
    with pytest.raises(SubjectError):
        s.registry_cmd("drop_all")
    with pytest.raises(SubjectError):
        Subjects.for_prefix("fleet.*")
