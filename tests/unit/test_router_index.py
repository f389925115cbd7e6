"""The indexed replica choice and the vector one (the model's columns) each equal the scan of the
model's replicas (the documented semantics, scan.py) over random fleets, loads, per-worker
measured rates, cooldowns, suspects, prefixes, clocks and draws, as the inputs change one at a
time; and the index's own pieces (levels, the n-th id, the timeline)."""

from __future__ import annotations

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from schemas.kv import KvBlocks
from schemas.load import ModelLoad, WorkerLoad
from schemas.registry import WorkerRecord, WorkerStatus
from services.registry.index import HEARTBEAT_LABEL
from services.router import scan
from services.router.core import Choice, FleetView
from services.router.index import Group, Timeline, nth, pick
from services.router.indexed import MAX_PROFILES
from services.router.policy import Prompt
from services.router.roster import Roster

S = WorkerStatus
IDS = [f"w{i}" for i in range(7)]
CHAIN = tuple(range(101, 109))  # a prompt's block hashes
# (slots, queue places, service_s, prefill/s): few profiles, as a fleet of a few kinds has
Speed = tuple[int, int, float | None, float | None]
MEASURED: list[Speed] = [(4, 4, 1.5, 4000.0), (2, 0, 3.0, 2500.0), (4, 4, 0.5, 20_000.0)]
UNMEASURED: list[Speed] = [(4, 4, None, None), (1, 2, None, None)]
MIXED: list[Speed] = [*MEASURED, *UNMEASURED, (4, 4, 1.0, None)]
# "own": each heartbeat carries the worker's own rates (EWMAs, as services/worker measures them),
# now and then unmeasured (None) or equal to another's (ties), slots and queue places at random
RATE = st.one_of(
    st.none(),
    st.sampled_from([0.5, 1.0, 1.05, 3.0]),
    st.floats(0.01, 10.0, allow_nan=False),
)
PREFILL = st.one_of(
    st.none(),
    st.sampled_from([2500.0, 4000.0, 4100.0]),
    st.floats(100.0, 50_000.0, allow_nan=False),
)
OWN = st.tuples(st.integers(1, 4), st.integers(0, 4), RATE, PREFILL)


WORKERS = st.lists(
    st.tuples(
        st.sampled_from(IDS),
        st.sampled_from([S.READY, S.READY, S.READY, S.PENDING, S.NOT_READY]),
        st.sampled_from([("m",), ("m",), ("m", "x"), ("x",), ("m", "m")]),
        st.sampled_from([{}, {}, {}, {HEARTBEAT_LABEL: "off"}]),
    ),
    max_size=7,
    unique_by=lambda w: w[0],
)


BATTERY = [
    (need_room, budget, prompt, exclude)
    for need_room in (False, True)
    for budget in (None, 0.3, 2.0)
    for prompt in (Prompt(), Prompt(tokens=4096, blocks=CHAIN))
    for exclude in (frozenset(), frozenset({"w0", "w3"}))
]


class Draws:
    """A draw that says what it returned and how often it was asked."""

    def __init__(self) -> None:
        self.value, self.calls = 0.5, 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


class SameAsScan(RuleBasedStateMachine):
    """One FleetView fed random inputs; every query is answered by its index and by scan.py."""

    @initialize(
        mode=st.sampled_from(["measured", "unmeasured", "mixed", "own", "own"]),
        policy=st.sampled_from(["cost", "cost", "least_busy"]),
        workers=WORKERS.filter(lambda ws: len(ws) >= 2),
    )
    def start(
        self, mode: str, policy: str, workers: list[tuple[str, S, tuple[str, ...], dict[str, str]]]
    ) -> None:
        self.mode = mode
        self.speeds: list[Speed] = {
            "measured": MEASURED,
            "unmeasured": UNMEASURED,
            "mixed": MIXED,
            "own": MIXED,
        }[mode]
        self.draws = Draws()
        self.view = FleetView("cost" if policy == "cost" else "least_busy", draw=self.draws)
        self.now = 100.0
        self.epochs = dict.fromkeys(IDS, 0)
        self.records(workers)

    @rule(workers=WORKERS)
    def records(self, workers: list[tuple[str, S, tuple[str, ...], dict[str, str]]]) -> None:
        self.view.set_records(
            {
                wid: WorkerRecord(
                    id=wid,
                    url=f"http://{wid}:1",
                    models=models,
                    status=status,
                    revision=1,
                    labels=labels,
                )
                for wid, status, models, labels in workers
            }
        )

    @rule(worker=WORKERS.filter(bool).map(lambda ws: ws[0]), drop=st.booleans())
    def one_record(
        self, worker: tuple[str, S, tuple[str, ...], dict[str, str]], drop: bool
    ) -> None:
        """A registry event: one record added, changed or removed (set_record / drop_record)."""
        wid, status, models, labels = worker
        if drop:
            self.view.drop_record(wid)
            assert wid not in self.view.beats
            assert wid not in self.view.dispatched
            return
        record = WorkerRecord(
            id=wid, url=f"http://{wid}:1", models=models, status=status, revision=2, labels=labels
        )
        self.view.set_record(record)

    @rule(
        wid=st.sampled_from(IDS),
        speed=st.integers(0, 5),
        running=st.integers(0, 4),
        queued=st.integers(0, 6),
        has_m=st.booleans(),
        age=st.sampled_from([0.0, 1.0, 2.5, 3.0, 4.0]),
        interval=st.sampled_from([1.0, 0.5]),
        own=OWN,
    )
    def heartbeat(
        self,
        wid: str,
        speed: int,
        running: int,
        queued: int,
        has_m: bool,
        age: float,
        interval: float,
        own: Speed,
    ) -> None:
        mif, mq, service_s, prefill = (
            own if self.mode == "own" else self.speeds[speed % len(self.speeds)]
        )
        models = [
            ModelLoad(
                id=model,
                in_flight=min(running, mif),
                queue_depth=min(queued, mq),
                max_in_flight=mif,
                max_queue_depth=mq,
                service_s=service_s,
                prefill_tokens_per_s=prefill,
            )
            for model in (("m", "x") if has_m or self.mode == "measured" else ("x",))
        ]
        load = WorkerLoad(
            worker_id=wid,
            url=f"http://{wid}:1",
            status=S.READY,
            models=tuple(models),
            heartbeat_interval_s=interval,
        )
        self.epochs[wid] += 1
        self.view.heartbeat(wid, self.epochs[wid], 1, load, self.now - age)

    @rule(wid=st.sampled_from(IDS), slots=st.integers(1, 3))
    def dispatched(self, wid: str, slots: int) -> None:
        self.view.dispatched_to(wid, slots)

    @rule(wid=st.sampled_from(IDS), retry=st.sampled_from([0.0, 0.5, 1.0, 5.0]))
    def refused(self, wid: str, retry: float) -> None:
        self.view.busy(wid, retry, self.now)

    @rule(wid=st.sampled_from(IDS))
    def unreachable(self, wid: str) -> None:
        self.view.connection_failed(wid, self.now)

    @rule(wid=st.sampled_from(IDS), held=st.integers(0, len(CHAIN)), seq=st.integers(1, 3))
    def cache(self, wid: str, held: int, seq: int) -> None:
        kv = KvBlocks(worker_id=wid, model="m", stored=(*CHAIN[:held], 7, 8), full=True)
        self.view.caches.apply(1, seq, kv)

    @rule(step=st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0, -0.5]))
    def clock(self, step: float) -> None:
        self.now += step  # backwards now and then: the index rebuilds, as it must

    @rule(
        model=st.sampled_from(["m", "m", "x", "y"]),
        exclude=st.frozensets(st.sampled_from(IDS), max_size=3),
        need_room=st.booleans(),
        slots=st.sampled_from([1, 1, 2, 5]),
        tokens=st.sampled_from([0, 64, 4096]),
        blocks=st.booleans(),
        budget=st.sampled_from([None, None, -1.0, 0.0, 0.3, 1.0, 2.0, 10.0]),
        draw=st.floats(0.0, 1.0, exclude_max=True),
    )
    def query(
        self,
        model: str,
        exclude: frozenset[str],
        need_room: bool,
        slots: int,
        tokens: int,
        blocks: bool,
        budget: float | None,
        draw: float,
    ) -> None:
        prompt = Prompt(tokens=tokens, blocks=CHAIN if blocks else ())
        self.same(model, exclude, need_room, slots, prompt, budget, draw)

    @invariant()
    def same_answers(self) -> None:
        """A battery of questions after every step, as the gateway and retries ask them."""
        for n, (need_room, budget, prompt, exclude) in enumerate(BATTERY):
            self.same("m", exclude, need_room, 1, prompt, budget, (n * 0.37) % 1)

    def same(
        self,
        model: str,
        exclude: frozenset[str],
        need_room: bool,
        slots: int,
        prompt: Prompt,
        budget: float | None,
        draw: float,
    ) -> None:
        v = self.view
        self.draws.value, self.draws.calls = draw, 0
        want = scan.choose(v, model, self.now, exclude, need_room, prompt, budget, slots)
        want_calls = self.draws.calls
        want_estimate = scan.best_estimate(v, model, self.now, prompt)
        for columns in (False, True):  # as the view chooses; then always by its columns
            v.max_profiles = 0 if columns else MAX_PROFILES
            vectored = v.vectored
            self.draws.calls = 0
            got = v.choose(model, self.now, exclude, need_room, prompt, budget, slots)
            assert got == want
            assert self.draws.calls == want_calls  # the next draw is the same for both
            path = "vector" if v.vectored > vectored else "index"
            event(f"{type(got).__name__} by {path}{' (forced)' if columns else ''}")
            assert v.best_estimate(model, self.now, prompt) == want_estimate
            off = any(r.labels for r in v.records.values())  # no heartbeats: unmeasured
            if not columns and (self.mode == "unmeasured" or (self.mode == "measured" and not off)):
                assert v.vectored == vectored  # no mix of measured and unmeasured: the index
        v.max_profiles = MAX_PROFILES

    @invariant()
    def reads(self) -> None:
        v = self.view
        ready = [r for r in v.records.values() if r.status == S.READY]
        assert v.ready_count() == len(ready)
        assert v.models() == sorted({m for r in ready for m in r.models})
        for model in ("m", "x", "y"):
            assert v.serves(model) is any(model in r.models for r in v.records.values())
        # the roster kept up one record at a time is the one built from all the records
        built = Roster(dict(v.records))
        assert {m: set(rs) for m, rs in v.roster.serving.items()} == {
            m: set(rs) for m, rs in built.serving.items()
        }
        assert {m: dict(rs) for m, rs in v.roster.serving.items()} == built.serving
        assert (v.roster.ready_of, v.roster.pending_of) == (built.ready_of, built.pending_of)


SameAsScan.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSameAsScan = SameAsScan.TestCase


def test_levels_stay_sorted_and_the_first_skips_only_the_left_out() -> None:
    g = Group()
    for busy, wid in [(3, "c"), (1, "b"), (1, "a"), (2, "d")]:
        g.add(busy, wid)
    assert (g.levels, g.ids[1]) == ([1, 2, 3], ["a", "b"])
    assert g.first(set()) == 1
    assert g.first({"a", "b"}) == 2
    assert g.first({"a", "b", "d", "c"}) is None
    g.remove(2, "d")
    assert g.levels == [1, 3]


def test_the_nth_id_among_a_level_and_singles_is_the_nth_of_their_sorted_union() -> None:
    ids = ["a", "c", "e", "g", "i"]
    skip = {"c", "g", "x"}
    singles = ["b", "h"]
    union = sorted([w for w in ids if w not in skip] + singles)  # a b e h i
    assert [pick([ids], skip, singles, n) for n in range(len(union))] == union
    assert [nth(ids, skip, n) for n in range(3)] == ["a", "e", "i"]
    assert pick([["a", "d"], ["b", "c"]], {"d"}, ["e"], 3) == "e"


def test_the_timeline_gives_what_lapsed_once_and_restarts_when_time_goes_back() -> None:
    t = Timeline()
    t.lapses(103.0, "a", stale=True)
    t.lapses(105.0, "b", stale=False)
    assert t.advance(103.0) == ([], [])  # fresh until 103 means fresh at 103
    assert t.advance(105.0) == ([(103.0, "a")], [(105.0, "b")])  # cooling until 105: not at 105
    assert t.advance(106.0) == ([], [])
    t.restart(100.0, [(103.0, "a")], [])
    assert t.at == 100.0


def test_a_record_written_in_place_is_indexed_like_set_records() -> None:
    record = WorkerRecord(id="a", url="http://a:1", models=("m",), status=S.READY, revision=1)
    v = FleetView()
    v.set_records({"a": record})
    assert v.choose("m", 100.0) == scan.choose(v, "m", 100.0)
    v.records["a"] = WorkerRecord(
        id="a", url="http://a:1", models=("m",), status=S.PENDING, revision=2
    )
    assert v.choose("m", 100.0) == scan.choose(v, "m", 100.0)
    assert v.models() == []
    del v.records["a"]
    assert not v.serves("m")


def test_the_peers_mean_is_summed_in_the_records_order_as_the_scan_sums_it() -> None:
    """(0.1 + 0.2) + 0.3 != (0.2 + 0.3) + 0.1: the columns are by id, the scan by record."""
    v = FleetView(draw=lambda: 0.0)
    rates = {"w2": 0.1, "w0": 0.2, "w1": 0.3, "w3": None}  # the records' order
    v.set_records(
        {
            w: WorkerRecord(id=w, url=f"http://{w}:1", models=("m",), status=S.READY, revision=1)
            for w in rates
        }
    )
    for w, rate in rates.items():
        busy = 2 if rate is None else 9  # the unmeasured one is the cheapest, at the peers' mean
        m = ModelLoad(
            id="m",
            in_flight=1,
            queue_depth=busy - 1,
            max_in_flight=1,
            max_queue_depth=9,
            service_s=rate,
        )
        v.heartbeat(w, 1, 1, WorkerLoad(worker_id=w, url="u", status=S.READY, models=(m,)), 100.0)
    v.max_profiles = 0  # the columns choose
    got = v.choose("m", 100.0)
    assert got == scan.choose(v, "m", 100.0)
    assert isinstance(got, Choice)
    assert got.worker_id == "w3"
    assert got.estimate_s == 2 * ((0.1 + 0.2) + 0.3) / 3 != 2 * ((0.2 + 0.3) + 0.1) / 3


def test_the_columns_keep_their_rows_through_cooldowns_and_new_records_of_the_same_workers() -> (
    None
):
    """A replica leaving the index and coming back, or the registry rewriting its records, costs
    no rebuild of the model's columns; a worker joining does."""
    v = FleetView()
    records = {
        w: WorkerRecord(id=w, url="u", models=("m",), status=S.READY, revision=1) for w in IDS
    }
    v.set_records(records)
    v.max_profiles = 0
    v.choose("m", 100.0)
    table = v.index["m"].table
    v.busy("w1", 1.0, 100.0)
    v.connection_failed("w2", 100.0)
    assert v.choose("m", 100.5) == scan.choose(v, "m", 100.5)
    assert v.choose("m", 101.5) == scan.choose(v, "m", 101.5)  # w1 is back
    v.set_records(dict(records))
    assert v.choose("m", 101.5) == scan.choose(v, "m", 101.5)
    assert v.index["m"].table is table
    v.set_records(
        records | {"w9": WorkerRecord(id="w9", url="u", models=("m",), status=S.READY, revision=1)}
    )
    assert v.choose("m", 101.5) == scan.choose(v, "m", 101.5)
    assert v.index["m"].table is not table
