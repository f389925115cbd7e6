"""Subject building and token validation."""

from __future__ import annotations

import pytest

from schemas.subjects import SubjectError, Subjects, inbox_prefix, prefix, token


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
    assert s.load("worker-1", "w1") == "prod.fleet.load.worker-1.w1"
    assert s.load_of("worker-1") == "prod.fleet.load.worker-1.*"
    assert s.load_all == "prod.fleet.load.*.*"
    assert s.worker_cmd("worker-1", "upsert") == "prod.fleet.registry.wcmd.worker-1.upsert"
    assert s.worker_cmd_of("worker-1") == "prod.fleet.registry.wcmd.worker-1.*"
    assert s.worker_cmd_all == "prod.fleet.registry.wcmd.*.*"
    assert s.capacity_view == "prod.fleet.capacity.view"
    assert s.capacity_snapshot == "prod.fleet.capacity.snapshot"
    assert s.kv_bucket("registry") == "prod_fleet_registry"


def test_subject_builders_validate_ids() -> None:
    s = Subjects.for_prefix("fleet")
    with pytest.raises(SubjectError):
        s.load("worker", "w.1")
    with pytest.raises(SubjectError):
        s.load("a.b", "w1")
    with pytest.raises(SubjectError):
        s.worker_cmd("*", "get")
    with pytest.raises(SubjectError):
        s.worker_cmd("worker", "drop_all")
    with pytest.raises(SubjectError):
        s.registry_cmd("drop_all")
    with pytest.raises(SubjectError):
        Subjects.for_prefix("fleet.*")


def test_the_principal_and_id_come_back_out_of_a_subject() -> None:
    s = Subjects.for_prefix("prod.fleet")
    assert s.parse_load(s.load("worker-1", "w1")) == ("worker-1", "w1")
    assert s.parse_worker_cmd(s.worker_cmd("worker-1", "get")) == ("worker-1", "get")
    for other in (
        "prod.fleet.load.w1",  # no principal
        "prod.fleet.load.a.b.c",
        "other.load.a.b",
        "prod.fleetx.load.a.b",
        "prod.fleet.registry.cmd.get",
        "prod.fleet.load..w1",
    ):
        assert s.parse_load(other) is None, other
        assert s.parse_worker_cmd(other) is None, other


def test_each_user_has_its_own_inbox_prefix() -> None:
    assert inbox_prefix("worker-1") == "_INBOX_worker-1"
    assert inbox_prefix("") == "_INBOX"  # no user: nats-py's default
    with pytest.raises(SubjectError):
        inbox_prefix("a.b")
