"""Registry core, table by table: register, replace, upsert, status, remove, liveness."""

from __future__ import annotations

import pytest

from schemas.registry import (
    CommandError,
    CommandOk,
    WorkerRegistered,
    WorkerRemoved,
    WorkerReplaced,
    WorkerSpec,
    WorkerStatus,
    WorkerStatusChanged,
)
from services.registry.core import (
    HEARTBEAT_LABEL,
    ClaimUrl,
    DeleteRecord,
    Outcome,
    PutRecord,
    RegistryState,
    ReleaseUrl,
)

S = WorkerStatus


def spec(url: str = "http://a:1", models: tuple[str, ...] = ("m1",), **kw: object) -> WorkerSpec:
    return WorkerSpec(url=url, models=models, **kw)  # type: ignore[arg-type]


def ok(outcome: Outcome) -> CommandOk:
    assert isinstance(outcome.reply, CommandOk), outcome.reply
    return outcome.reply


def err(outcome: Outcome, code: str) -> CommandError:
    assert isinstance(outcome.reply, CommandError), outcome.reply
    assert outcome.reply.code == code
    assert outcome.events == ()
    assert outcome.writes == ()
    return outcome.reply


def test_register_creates_pending_record_with_claim_and_event() -> None:
    st = RegistryState()
    out = st.register(spec(models=("m1", "m2", "m1")), "w1", now=10.0)
    rec = ok(out).worker
    assert rec is not None
    assert (rec.id, rec.status, rec.revision, rec.registered_at) == ("w1", S.PENDING, 1, 10.0)
    assert rec.models == ("m1", "m2")  # duplicates dropped, order kept
    assert out.events == (WorkerRegistered(worker=rec),)
    assert out.writes == (ClaimUrl("http://a:1", "w1"), PutRecord(rec, create=True))
    assert st.url_index == {"http://a:1": "w1"}
    assert st.model_index == {"m1": {"w1"}, "m2": {"w1"}}


def test_register_duplicate_url_conflicts_and_changes_nothing() -> None:
    st = RegistryState()
    st.register(spec(), "w1", 0.0)
    before = (dict(st.records), dict(st.url_index))
    assert err(st.register(spec(models=("other",)), "w2", 0.0), "conflict").field == "url"
    assert (st.records, st.url_index) == before
    assert "other" not in st.model_index


def test_replace_diffs_model_index_and_bumps_revision() -> None:
    st = RegistryState()
    st.register(spec(models=("a", "b")), "w1", 0.0)
    out = st.replace("w1", spec(models=("b", "c")), 1.0)
    new = ok(out).worker
    assert new is not None
    assert new.revision == 2
    assert isinstance(out.events[0], WorkerReplaced)
    assert out.events[0].old.models == ("a", "b")
    assert st.model_index == {"b": {"w1"}, "c": {"w1"}}
    assert out.writes == (PutRecord(new, create=False),)


def test_replace_with_identical_spec_is_a_no_op() -> None:
    st = RegistryState()
    st.register(spec(), "w1", 0.0)
    out = st.replace("w1", spec(), 1.0)
    assert ok(out).applied is False
    assert out.events == ()
    assert out.writes == ()


def test_replace_url_change_claims_new_releases_old() -> None:
    st = RegistryState()
    st.register(spec("http://a:1"), "w1", 0.0)
    out = st.replace("w1", spec("http://b:1"), 1.0)
    new = ok(out).worker
    assert new is not None
    assert out.writes == (
        ClaimUrl("http://b:1", "w1"),
        PutRecord(new, create=False),
        ReleaseUrl("http://a:1"),
    )
    assert st.url_index == {"http://b:1": "w1"}


def test_replace_onto_another_workers_url_is_rejected() -> None:
    st = RegistryState()
    st.register(spec("http://a:1"), "w1", 0.0)
    st.register(spec("http://b:1", ("x",)), "w2", 0.0)
    assert err(st.replace("w1", spec("http://b:1"), 1.0), "conflict").field == "url"
    assert st.url_index == {"http://a:1": "w1", "http://b:1": "w2"}
    assert st.records["w1"].url == "http://a:1"
    assert err(st.replace("nope", spec("http://c:1"), 1.0), "not_found").field == "id"


@pytest.mark.parametrize(
    ("status", "after"),
    [(S.FAILED, S.PENDING), (S.NOT_READY, S.PENDING), (S.READY, S.READY), (S.DRAINING, S.DRAINING)],
)
def test_replace_status_rules(status: WorkerStatus, after: WorkerStatus) -> None:
    st = RegistryState()
    st.register(spec(), "w1", 0.0)
    if status != S.PENDING:
        ok(st.set_status("w1", status))
    rec = ok(st.replace("w1", spec(models=("m9",)), 1.0)).worker
    assert rec is not None
    assert rec.status == after


def test_upsert_registers_then_replaces() -> None:
    st = RegistryState()
    first = st.upsert(spec(), "w1", 0.0)
    assert isinstance(first.events[0], WorkerRegistered)
    again = st.upsert(spec(), "w2", 1.0)
    assert ok(again).applied is False
    assert ok(again).worker == st.records["w1"]
    changed = st.upsert(spec(models=("m2",)), "w3", 2.0)
    assert isinstance(changed.events[0], WorkerReplaced)
    assert set(st.records) == {"w1"}


TRANSITION_CASES = [
    (S.PENDING, S.READY, True),
    (S.PENDING, S.NOT_READY, True),
    (S.READY, S.NOT_READY, True),
    (S.NOT_READY, S.READY, True),
    (S.READY, S.DRAINING, True),
    (S.DRAINING, S.READY, True),
    (S.READY, S.FAILED, True),
    (S.READY, S.PENDING, False),
    (S.FAILED, S.READY, False),
    (S.FAILED, S.PENDING, False),
]


@pytest.mark.parametrize(("start", "target", "allowed"), TRANSITION_CASES)
def test_status_transitions(start: WorkerStatus, target: WorkerStatus, allowed: bool) -> None:
    st = RegistryState()
    st.register(spec(), "w1", 0.0)
    path = {
        S.PENDING: [],
        S.READY: [S.READY],
        S.NOT_READY: [S.NOT_READY],
        S.DRAINING: [S.DRAINING],
        S.FAILED: [S.FAILED],
    }[start]
    for step in path:
        ok(st.set_status("w1", step))
    out = st.set_status("w1", target, reason="test")
    if allowed:
        assert out.events == (
            WorkerStatusChanged(
                worker_id="w1",
                old_status=start,
                new_status=target,
                revision=st.records["w1"].revision,
                reason="test",
                worker=st.records["w1"],
            ),
        )
    else:
        err(out, "invalid")


def test_first_ready_emits_status_changed() -> None:
    """SMG missed the Pending -> Ready event; we must not."""
    st = RegistryState()
    st.register(spec(), "w1", 0.0)
    out = st.heartbeat("w1", S.READY, 0.5)
    assert len(out.events) == 1
    ev = out.events[0]
    assert isinstance(ev, WorkerStatusChanged)
    assert (ev.old_status, ev.new_status, ev.reason) == (S.PENDING, S.READY, "heartbeat")


def test_set_status_expected_revision_and_no_op() -> None:
    st = RegistryState()
    st.register(spec(), "w1", 0.0)
    assert err(st.set_status("w1", S.READY, expected_revision=5), "conflict").field == (
        "expected_revision"
    )
    ok(st.set_status("w1", S.READY, expected_revision=1))
    same = st.set_status("w1", S.READY)
    assert ok(same).applied is False
    assert same.events == ()
    err(st.set_status("zz", S.READY), "not_found")


def test_remove_clears_every_index() -> None:
    st = RegistryState()
    st.register(spec(models=("a",)), "w1", 0.0)
    out = st.remove("w1", reason="admin")
    assert isinstance(out.events[0], WorkerRemoved)
    assert out.writes == (DeleteRecord("w1"), ReleaseUrl("http://a:1"))
    assert (st.records, st.url_index, st.model_index) == ({}, {}, {})
    err(st.remove("w1"), "not_found")
    ok(st.register(spec(), "w2", 1.0))  # the URL is free again


def test_heartbeat_ttl_expiry_and_recovery() -> None:
    st = RegistryState()
    st.register(spec(), "w1", 0.0)
    st.heartbeat("w1", S.READY, 1.0)
    assert st.expired(now=3.9, ttl_s=3.0) == []
    assert st.expired(now=4.0, ttl_s=3.0) == []  # exactly at the TTL is still alive
    assert st.expired(now=4.01, ttl_s=3.0) == ["w1"]
    out = st.expire_one("w1")
    assert isinstance(out.events[0], WorkerStatusChanged)
    assert out.events[0].new_status == S.NOT_READY
    back = st.heartbeat("w1", S.READY, 5.0)
    assert isinstance(back.events[0], WorkerStatusChanged)
    assert back.events[0].new_status == S.READY


def test_draining_and_opted_out_workers_do_not_expire() -> None:
    st = RegistryState()
    st.register(spec("http://a:1"), "w1", 0.0)
    st.register(spec("http://b:1", labels={HEARTBEAT_LABEL: "off"}), "w2", 0.0)
    ok(st.set_status("w1", S.DRAINING))
    ok(st.set_status("w2", S.READY))
    assert st.expired(now=100.0, ttl_s=3.0) == []
    # A draining worker's heartbeat does not undrain it.
    assert st.heartbeat("w1", S.READY, 101.0).events == ()


def test_heartbeat_from_unknown_worker_is_an_error_value() -> None:
    err(RegistryState().heartbeat("ghost", S.READY, 0.0), "not_found")


def test_load_gives_grace_and_rebuilds_indexes() -> None:
    st = RegistryState()
    st.register(spec(models=("a",)), "w1", 0.0)
    ok(st.set_status("w1", S.READY))
    records = list(st.records.values())
    fresh = RegistryState()
    fresh.load(records, now=50.0)
    assert fresh.model_index == {"a": {"w1"}}
    assert fresh.expired(now=52.0, ttl_s=3.0) == []
    assert fresh.expired(now=53.5, ttl_s=3.0) == ["w1"]


def test_list_and_get() -> None:
    st = RegistryState()
    st.register(spec("http://a:1", ("x",)), "w2", 0.0)
    st.register(spec("http://b:1", ("y",)), "w1", 0.0)
    assert [r.id for r in ok(st.list_workers()).workers] == ["w1", "w2"]
    assert [r.id for r in ok(st.list_workers("x")).workers] == ["w2"]
    assert ok(st.list_workers("none")).workers == ()
    assert ok(st.get("w1")).worker == st.records["w1"]
    err(st.get("w9"), "not_found")
