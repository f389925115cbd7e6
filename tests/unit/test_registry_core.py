"""Registry core, table by table: register, replace, upsert, status, remove, liveness, commands."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from schemas import codec
from schemas.registry import (
    COMMANDS,
    Command,
    CommandError,
    CommandOk,
    GetRequest,
    ListRequest,
    RegisterRequest,
    RemoveRequest,
    ReplaceRequest,
    SetStatusRequest,
    UpsertRequest,
    WorkerRegistered,
    WorkerRemoved,
    WorkerReplaced,
    WorkerSpec,
    WorkerStatus,
    WorkerStatusChanged,
)
from schemas.subjects import COMMAND_OPS, Subjects
from services.registry.access import authorize
from services.registry.core import HEARTBEAT_LABEL, OPERATOR, RegistryBook
from services.registry.effects import ClaimUrl, DeleteRecord, Effect, PutRecord, ReleaseUrl
from services.registry.nats_edge import COMMAND_DECODERS

S = WorkerStatus


def spec(url: str = "http://a:1", models: tuple[str, ...] = ("m1",), **kw: object) -> WorkerSpec:
    return WorkerSpec(url=url, models=models, **kw)  # type: ignore[arg-type]


def ok(effect: Effect) -> CommandOk:
    assert isinstance(effect.reply, CommandOk), effect.reply
    return effect.reply


def err(effect: Effect, code: str) -> CommandError:
    assert isinstance(effect.reply, CommandError), effect.reply
    assert effect.reply.code == code
    assert effect.events == ()
    assert effect.writes == ()
    return effect.reply


def test_register_creates_pending_record_with_claim_and_event() -> None:
    st = RegistryBook()
    out = st.commit(st.register(spec(models=("m1", "m2", "m1")), "w1", now=10.0))
    rec = ok(out).worker
    assert rec is not None
    assert (rec.id, rec.status, rec.revision, rec.registered_at) == ("w1", S.PENDING, 1, 10.0)
    assert rec.models == ("m1", "m2")  # duplicates dropped, order kept
    assert out.events == (WorkerRegistered(worker=rec),)
    assert out.writes == (ClaimUrl("http://a:1", "w1"), PutRecord(rec, create=True))
    assert st.url_index == {"http://a:1": "w1"}
    assert st.model_index == {"m1": {"w1"}, "m2": {"w1"}}


def test_register_duplicate_url_conflicts_and_changes_nothing() -> None:
    st = RegistryBook()
    st.commit(st.register(spec(), "w1", 0.0))
    before = (dict(st.records), dict(st.url_index))
    assert (
        err(st.commit(st.register(spec(models=("other",)), "w2", 0.0)), "conflict").field == "url"
    )
    assert (st.records, st.url_index) == before
    assert "other" not in st.model_index


def test_replace_diffs_model_index_and_bumps_revision() -> None:
    st = RegistryBook()
    st.commit(st.register(spec(models=("a", "b")), "w1", 0.0))
    out = st.commit(st.replace("w1", spec(models=("b", "c")), 1.0))
    new = ok(out).worker
    assert new is not None
    assert new.revision == 2
    assert isinstance(out.events[0], WorkerReplaced)
    assert out.events[0].old.models == ("a", "b")
    assert st.model_index == {"b": {"w1"}, "c": {"w1"}}
    assert out.writes == (PutRecord(new, create=False),)


def test_replace_with_identical_spec_is_a_no_op() -> None:
    st = RegistryBook()
    st.commit(st.register(spec(), "w1", 0.0))
    out = st.commit(st.replace("w1", spec(), 1.0))
    assert ok(out).applied is False
    assert out.events == ()
    assert out.writes == ()


def test_replace_url_change_claims_new_releases_old() -> None:
    st = RegistryBook()
    st.commit(st.register(spec("http://a:1"), "w1", 0.0))
    out = st.commit(st.replace("w1", spec("http://b:1"), 1.0))
    new = ok(out).worker
    assert new is not None
    assert out.writes == (
        ClaimUrl("http://b:1", "w1"),
        PutRecord(new, create=False),
        ReleaseUrl("http://a:1"),
    )
    assert st.url_index == {"http://b:1": "w1"}


def test_replace_onto_another_workers_url_is_rejected() -> None:
    st = RegistryBook()
    st.commit(st.register(spec("http://a:1"), "w1", 0.0))
    st.commit(st.register(spec("http://b:1", ("x",)), "w2", 0.0))
    assert err(st.commit(st.replace("w1", spec("http://b:1"), 1.0)), "conflict").field == "url"
    assert st.url_index == {"http://a:1": "w1", "http://b:1": "w2"}
    assert st.records["w1"].url == "http://a:1"
    assert err(st.commit(st.replace("nope", spec("http://c:1"), 1.0)), "not_found").field == "id"


@pytest.mark.parametrize(
    ("status", "after"),
    [(S.FAILED, S.PENDING), (S.NOT_READY, S.PENDING), (S.READY, S.READY), (S.DRAINING, S.DRAINING)],
)
def test_replace_status_rules(status: WorkerStatus, after: WorkerStatus) -> None:
    st = RegistryBook()
    st.commit(st.register(spec(), "w1", 0.0))
    if status != S.PENDING:
        ok(st.commit(st.set_status("w1", status)))
    rec = ok(st.commit(st.replace("w1", spec(models=("m9",)), 1.0))).worker
    assert rec is not None
    assert rec.status == after


def test_upsert_registers_then_replaces() -> None:
    st = RegistryBook()
    first = st.commit(st.upsert(spec(), "w1", 0.0))
    assert isinstance(first.events[0], WorkerRegistered)
    again = st.commit(st.upsert(spec(), "w2", 1.0))
    assert ok(again).applied is False
    assert ok(again).worker == st.records["w1"]
    changed = st.commit(st.upsert(spec(models=("m2",)), "w3", 2.0))
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
    st = RegistryBook()
    st.commit(st.register(spec(), "w1", 0.0))
    path = {
        S.PENDING: [],
        S.READY: [S.READY],
        S.NOT_READY: [S.NOT_READY],
        S.DRAINING: [S.DRAINING],
        S.FAILED: [S.FAILED],
    }[start]
    for step in path:
        ok(st.commit(st.set_status("w1", step)))
    out = st.commit(st.set_status("w1", target, reason="test"))
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
    st = RegistryBook()
    st.commit(st.register(spec(), "w1", 0.0))
    out = st.commit(st.heartbeat("w1", S.READY, 0.5))
    assert len(out.events) == 1
    ev = out.events[0]
    assert isinstance(ev, WorkerStatusChanged)
    assert (ev.old_status, ev.new_status, ev.reason) == (S.PENDING, S.READY, "heartbeat")


def test_set_status_expected_revision_and_no_op() -> None:
    st = RegistryBook()
    st.commit(st.register(spec(), "w1", 0.0))
    assert err(st.commit(st.set_status("w1", S.READY, expected_revision=5)), "conflict").field == (
        "expected_revision"
    )
    ok(st.commit(st.set_status("w1", S.READY, expected_revision=1)))
    same = st.commit(st.set_status("w1", S.READY))
    assert ok(same).applied is False
    assert same.events == ()
    err(st.commit(st.set_status("zz", S.READY)), "not_found")


def test_remove_clears_every_index() -> None:
    st = RegistryBook()
    st.commit(st.register(spec(models=("a",)), "w1", 0.0))
    out = st.commit(st.remove("w1", reason="admin"))
    assert isinstance(out.events[0], WorkerRemoved)
    assert out.writes == (DeleteRecord("w1"), ReleaseUrl("http://a:1"))
    assert (st.records, st.url_index, st.model_index) == ({}, {}, {})
    err(st.commit(st.remove("w1")), "not_found")
    ok(st.commit(st.register(spec(), "w2", 1.0)))  # the URL is free again


def test_heartbeat_ttl_expiry_and_recovery() -> None:
    st = RegistryBook()
    st.commit(st.register(spec(), "w1", 0.0))
    st.commit(st.heartbeat("w1", S.READY, 1.0))
    assert st.expired(now=3.9, ttl_s=3.0) == []
    assert st.expired(now=4.0, ttl_s=3.0) == []  # exactly at the TTL is still alive
    assert st.expired(now=4.01, ttl_s=3.0) == ["w1"]
    assert ok(st.expire_one("w1", now=3.9, ttl_s=3.0)).applied is False
    out = st.commit(st.expire_one("w1", now=4.01, ttl_s=3.0))
    assert isinstance(out.events[0], WorkerStatusChanged)
    assert out.events[0].new_status == S.NOT_READY
    back = st.commit(st.heartbeat("w1", S.READY, 5.0))
    assert isinstance(back.events[0], WorkerStatusChanged)
    assert back.events[0].new_status == S.READY


def test_draining_and_opted_out_workers_do_not_expire() -> None:
    st = RegistryBook()
    st.commit(st.register(spec("http://a:1"), "w1", 0.0))
    st.commit(st.register(spec("http://b:1", labels={HEARTBEAT_LABEL: "off"}), "w2", 0.0))
    ok(st.commit(st.set_status("w1", S.DRAINING)))
    ok(st.commit(st.set_status("w2", S.READY)))
    assert st.expired(now=100.0, ttl_s=3.0) == []
    # A draining worker's heartbeat does not undrain it.
    assert st.commit(st.heartbeat("w1", S.READY, 101.0)).events == ()


def test_heartbeat_from_unknown_worker_is_an_error_value() -> None:
    err(RegistryBook().heartbeat("ghost", S.READY, 0.0), "not_found")


def test_load_gives_grace_and_rebuilds_indexes() -> None:
    st = RegistryBook()
    st.commit(st.register(spec(models=("a",)), "w1", 0.0))
    ok(st.commit(st.set_status("w1", S.READY)))
    records = list(st.records.values())
    fresh = RegistryBook()
    fresh.load(records, now=50.0)
    assert fresh.model_index == {"a": {"w1"}}
    assert fresh.expired(now=52.0, ttl_s=3.0) == []
    assert fresh.expired(now=53.5, ttl_s=3.0) == ["w1"]


def test_list_and_get() -> None:
    st = RegistryBook()
    st.commit(st.register(spec("http://a:1", ("x",)), "w2", 0.0))
    st.commit(st.register(spec("http://b:1", ("y",)), "w1", 0.0))
    assert [r.id for r in ok(st.list_workers()).workers] == ["w1", "w2"]
    assert [r.id for r in ok(st.list_workers("x")).workers] == ["w2"]
    assert ok(st.list_workers("none")).workers == ()
    assert ok(st.get("w1")).worker == st.records["w1"]
    err(st.get("w9"), "not_found")


def two_workers() -> RegistryBook:
    """w1 Ready on http://a:1 serving a, w2 Pending on http://b:1 serving b."""
    st = RegistryBook()
    st.commit(st.register(spec("http://a:1", ("a",)), "w1", 0.0))
    st.commit(st.register(spec("http://b:1", ("b",)), "w2", 0.0))
    st.commit(st.set_status("w1", S.READY))
    return st


def snapshot(st: RegistryBook) -> tuple[object, ...]:
    models = {m: set(ids) for m, ids in st.model_index.items()}
    return dict(st.records), dict(st.url_index), models, dict(st.last_heartbeat)


# (name, plan on two_workers(), ids present after the commit, url_index after, fresh beats after)
Planner = Callable[[RegistryBook], Effect]
PLAN_CASES: list[tuple[str, Planner, set[str], dict[str, str], dict[str, float]]] = [
    (
        "register",
        lambda st: st.register(spec("http://c:1", ("c",)), "w3", 7.0),
        {"w1", "w2", "w3"},
        {"http://a:1": "w1", "http://b:1": "w2", "http://c:1": "w3"},
        {"w3": 7.0},
    ),
    (
        "replace_url_and_models",
        lambda st: st.replace("w1", spec("http://c:1", ("c",)), 7.0),
        {"w1", "w2"},
        {"http://c:1": "w1", "http://b:1": "w2"},
        {"w1": 7.0},
    ),
    (
        "upsert_new",
        lambda st: st.upsert(spec("http://c:1", ("c",)), "w3", 7.0),
        {"w1", "w2", "w3"},
        {"http://a:1": "w1", "http://b:1": "w2", "http://c:1": "w3"},
        {"w3": 7.0},
    ),
    (
        "upsert_existing",
        lambda st: st.upsert(spec("http://b:1", ("b", "c")), "w3", 7.0),
        {"w1", "w2"},
        {"http://a:1": "w1", "http://b:1": "w2"},
        {"w2": 7.0},
    ),
    (
        "set_status",
        lambda st: st.set_status("w2", S.DRAINING),
        {"w1", "w2"},
        {"http://a:1": "w1", "http://b:1": "w2"},
        {},
    ),
    ("remove", lambda st: st.remove("w1"), {"w2"}, {"http://b:1": "w2"}, {}),
    (
        "expire_by_ttl",
        lambda st: st.expire_one("w1", now=9.0, ttl_s=3.0),
        {"w1", "w2"},
        {"http://a:1": "w1", "http://b:1": "w2"},
        {},
    ),
    (
        "heartbeat_makes_ready",
        lambda st: st.heartbeat("w2", S.READY, 7.0),
        {"w1", "w2"},
        {"http://a:1": "w1", "http://b:1": "w2"},
        {"w2": 7.0},
    ),
]


@pytest.mark.parametrize(
    ("plan", "ids", "urls", "beats"), [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES]
)
def test_operations_plan_without_changing_state_until_committed(
    plan: Callable[[RegistryBook], Effect],
    ids: set[str],
    urls: dict[str, str],
    beats: dict[str, float],
) -> None:
    """The shell commits only after the KV writes succeeded: a failed write must leave no trace."""
    st = two_workers()
    before = snapshot(st)
    out = plan(st)
    assert out.writes
    assert out.events
    assert snapshot(st) == before  # planned, not applied: dropping the effect is a rollback

    st.commit(out)
    assert set(st.records) == ids
    assert st.url_index == urls
    expected_models: dict[str, set[str]] = {}
    for record in st.records.values():
        for model in record.models:
            expected_models.setdefault(model, set()).add(record.id)
    assert st.model_index == expected_models
    assert st.last_heartbeat == {**{i: 0.0 for i in ids}, **beats}
    changed = ok(out).worker
    assert changed is not None
    if changed.id in ids:  # the record in memory is exactly the one the KV write persisted
        assert st.records[changed.id] == changed
        assert PutRecord(changed, create=changed.revision == 1) in out.writes


def test_reconnect_grace_restarts_every_liveness_clock() -> None:
    """Heartbeats missed while NATS was down must not count once it is back."""
    st = two_workers()
    st.commit(st.heartbeat("w1", S.READY, 1.0))
    assert st.expired(now=10.0, ttl_s=3.0) == ["w1"]
    st.grace(now=10.0)
    assert st.last_heartbeat == {"w1": 10.0, "w2": 10.0}
    assert st.expired(now=12.9, ttl_s=3.0) == []
    assert st.expired(now=13.5, ttl_s=3.0) == ["w1"]


# ---- ownership: a worker principal touches only its own records ----

A, B = "worker-a", "worker-b"


def fleet_of_owners() -> RegistryBook:
    """a1 (A's, Ready), b1 (B's, Ready), o1 (an operator's, Ready), o2 (an operator's, NotReady:
    nobody serves it), o3 (an operator's, Pending, managed by hand: heartbeat=off)."""
    st = RegistryBook()
    st.commit(st.register(spec("http://a:1"), "a1", 0.0, owner=A))
    st.commit(st.register(spec("http://b:1"), "b1", 0.0, owner=B))
    st.commit(st.register(spec("http://o:1"), "o1", 0.0))
    st.commit(st.register(spec("http://o:2"), "o2", 0.0))
    st.commit(st.register(spec("http://o:3", labels={HEARTBEAT_LABEL: "off"}), "o3", 0.0))
    for worker_id in ("a1", "b1", "o1"):
        st.commit(st.set_status(worker_id, S.READY))
    st.commit(st.set_status("o2", S.NOT_READY))
    return st


AUTH_CASES: list[tuple[str, Command, str | None]] = [
    # (principal, request, refusal code or None)
    (A, RegisterRequest(worker=spec("http://new:1")), None),
    (A, UpsertRequest(worker=spec("http://new:1")), None),
    (A, UpsertRequest(worker=spec("http://a:1", ("m2",))), None),
    (A, UpsertRequest(worker=spec("http://b:1")), "forbidden"),  # B's
    (A, UpsertRequest(worker=spec("http://o:1")), "forbidden"),  # an operator's, Ready
    (A, UpsertRequest(worker=spec("http://o:2")), None),  # an operator's nobody serves
    (A, UpsertRequest(worker=spec("http://o:3")), "forbidden"),  # managed by hand
    (A, ReplaceRequest(id="a1", worker=spec("http://a:2")), None),
    (A, ReplaceRequest(id="b1", worker=spec("http://evil:1")), "forbidden"),
    (A, ReplaceRequest(id="o1", worker=spec("http://evil:1")), "forbidden"),
    (A, ReplaceRequest(id="nope", worker=spec("http://evil:1")), None),  # answers not_found
    (A, SetStatusRequest(id="a1", status=S.DRAINING), None),
    (A, SetStatusRequest(id="b1", status=S.FAILED), "forbidden"),
    (A, SetStatusRequest(id="o2", status=S.FAILED), "forbidden"),
    (A, RemoveRequest(id="a1"), None),
    (A, RemoveRequest(id="b1"), "forbidden"),
    (A, GetRequest(id="a1"), None),
    (A, GetRequest(id="b1"), "forbidden"),
    (A, ListRequest(), "forbidden"),
    (B, ReplaceRequest(id="b1", worker=spec("http://b:2")), None),
    (B, ReplaceRequest(id="a1", worker=spec("http://evil:1")), "forbidden"),
    (OPERATOR, ReplaceRequest(id="b1", worker=spec("http://b:2")), None),
    (OPERATOR, SetStatusRequest(id="a1", status=S.FAILED), None),
    (OPERATOR, UpsertRequest(worker=spec("http://b:1", ("m2",))), None),
    (OPERATOR, RemoveRequest(id="o3"), None),
    (OPERATOR, ListRequest(), None),
]


@pytest.mark.parametrize(
    ("principal", "request_", "refused"),
    AUTH_CASES,
    ids=[f"{i}-{p or 'operator'}-{type(r).__name__}-{c}" for i, (p, r, c) in enumerate(AUTH_CASES)],
)
def test_authorize(principal: str, request_: Command, refused: str | None) -> None:
    st = fleet_of_owners()
    decision = authorize(st, principal, request_)
    assert (None if decision is None else decision.code) == refused
    before = snapshot(st)
    out = st.run(request_, principal, "new", 5.0)
    if refused is not None:  # refused before anything was planned
        err(out, refused)
        assert snapshot(st) == before
        assert decision is not None
        assert principal in decision.message


def test_a_workers_records_are_its_own_and_stay_its_own() -> None:
    st = fleet_of_owners()
    mine = ok(st.commit(st.run(RegisterRequest(worker=spec("http://new:1")), A, "n1", 1.0)))
    assert mine.worker is not None
    assert mine.worker.owner == A
    # an operator's replace changes the spec, never the owner
    st.commit(st.run(ReplaceRequest(id="n1", worker=spec("http://new:2")), OPERATOR, "", 2.0))
    assert st.records["n1"].owner == A
    st.commit(st.run(UpsertRequest(worker=spec("http://new:2", ("m9",))), OPERATOR, "x", 3.0))
    assert st.records["n1"].owner == A
    # a worker's upsert takes over an operator's record nobody serves (e.g. from before owners)
    taken = ok(st.commit(st.run(UpsertRequest(worker=spec("http://o:2")), B, "x", 4.0)))
    assert taken.worker is not None
    assert (taken.worker.id, taken.worker.owner, taken.worker.status) == ("o2", B, S.PENDING)
    # and the operator's record that is served stays the operator's
    err(st.run(UpsertRequest(worker=spec("http://o:1")), B, "x", 5.0), "forbidden")
    assert st.records["o1"].owner == OPERATOR


def test_only_the_owner_heartbeats_a_record() -> None:
    st = fleet_of_owners()
    st.commit(st.set_status("a1", S.NOT_READY))
    err(st.heartbeat("a1", S.READY, 1.0, principal=B), "forbidden")
    err(st.heartbeat("o2", S.READY, 1.0, principal=B), "forbidden")
    assert (st.records["a1"].status, st.records["o2"].status) == (S.NOT_READY, S.NOT_READY)
    out = st.commit(st.heartbeat("a1", S.READY, 1.0, principal=A))
    assert ok(out).worker == st.records["a1"]
    assert (st.records["a1"].status, out.beats) == (S.READY, (("a1", 1.0),))


# ---- per-model slots ----


@pytest.mark.parametrize(
    "plan",
    [
        lambda st: st.register(spec("http://c:1", ("a",), model_slots={"b": 8}), "w3", 1.0),
        lambda st: st.upsert(spec("http://c:1", ("a",), model_slots={"b": 8}), "w3", 1.0),
        lambda st: st.replace("w1", spec("http://a:1", ("a",), model_slots={"b": 8}), 1.0),
        lambda st: st.upsert(spec("http://a:1", ("a",), model_slots={"a": 8, "b": 8}), "x", 1.0),
    ],
    ids=["register", "upsert_new", "replace", "upsert_existing"],
)
def test_model_slots_may_name_only_served_models(plan: Planner) -> None:
    st = two_workers()
    before = snapshot(st)
    refused = err(st.commit(plan(st)), "invalid")
    assert refused.field == "model_slots"
    assert "'b'" in refused.message
    assert snapshot(st) == before


def test_model_slots_are_carried_through_register_replace_and_upsert() -> None:
    st = RegistryBook()
    two = spec(models=("a", "b"), max_running_requests=16, model_slots={"a": 8, "b": 8})
    rec = ok(st.commit(st.register(two, "w1", 0.0))).worker
    assert rec is not None
    assert (rec.max_running_requests, rec.model_slots) == (16, {"a": 8, "b": 8})
    # a change of model_slots alone is a change: revision + 1, an event
    uneven = spec(models=("a", "b"), max_running_requests=16, model_slots={"a": 12, "b": 4})
    out = st.commit(st.replace("w1", uneven, 1.0))
    assert ok(out).worker == st.records["w1"]
    assert (st.records["w1"].model_slots, st.records["w1"].revision) == ({"a": 12, "b": 4}, 2)
    assert isinstance(out.events[0], WorkerReplaced)
    again = st.commit(st.upsert(uneven, "x", 2.0))
    assert ok(again).applied is False
    st.commit(st.upsert(spec(models=("a", "b"), max_running_requests=16), "x", 3.0))
    assert st.records["w1"].model_slots == {}  # the spec is the whole truth: omitted = unknown


# ---- the command table: one op, one subject, one request type, one handler ----

EXAMPLES: dict[type[Command], Command] = {
    RegisterRequest: RegisterRequest(worker=spec("http://new:1")),
    ReplaceRequest: ReplaceRequest(id="a1", worker=spec("http://a:2")),
    UpsertRequest: UpsertRequest(worker=spec("http://new:2")),
    SetStatusRequest: SetStatusRequest(id="a1", status=S.DRAINING),
    RemoveRequest: RemoveRequest(id="b1"),
    GetRequest: GetRequest(id="o1"),
    ListRequest: ListRequest(model="m1"),
}


def test_every_op_has_a_subject_a_request_type_and_a_handler() -> None:
    """The subjects, the client's op lookup and the registry's decode/dispatch all come from
    COMMANDS: a command missing from any of them fails here."""
    assert set(EXAMPLES) == set(COMMANDS.values())  # a new command needs an example here
    assert COMMAND_OPS == tuple(COMMANDS) == tuple(COMMAND_DECODERS)
    subjects = Subjects.for_prefix("p")
    for op, type_ in COMMANDS.items():
        request = EXAMPLES[type_]
        assert request.op == op  # what RegistryClient.call sends it on
        assert subjects.registry_cmd(op) == f"p.registry.cmd.{op}"
        assert subjects.worker_cmd("w", op) == f"p.registry.wcmd.w.{op}"
        body = codec.encode(request)  # the bare request: the op travels in the subject only
        assert set(codec.decode(body, dict)) == set(type_.__struct_fields__)
        assert COMMAND_DECODERS[op].decode(body) == request
        effect = fleet_of_owners().run(request, OPERATOR, "new", 1.0)
        assert isinstance(effect.reply, CommandOk), (op, effect.reply)
