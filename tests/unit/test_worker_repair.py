"""What a worker does about its registry record when someone else changed it (pure table)."""

from __future__ import annotations

import msgspec
import pytest

from schemas.registry import WorkerRecord, WorkerSpec, WorkerStatus
from services.worker.core import Repair, repair

S = WorkerStatus
SPEC = WorkerSpec(
    url="http://w:1",
    models=("m", "n"),
    max_running_requests=4,
    model_slots={"m": 3, "n": 1},
    labels={"a": "b"},
)
RECORD = WorkerRecord(
    id="w1",
    url=SPEC.url,
    models=SPEC.models,
    status=S.READY,
    revision=3,
    max_running_requests=4,
    model_slots={"m": 3, "n": 1},
    labels={"a": "b"},
    owner="worker-1",
)


def record(**changes: object) -> WorkerRecord:
    return msgspec.structs.replace(RECORD, **changes)


CASES: list[tuple[str, WorkerRecord | None, WorkerStatus, Repair | None]] = [
    ("as chosen", RECORD, S.READY, None),
    ("gone", None, S.READY, "register"),
    ("url changed", record(url="http://evil:1"), S.READY, "replace"),
    ("models changed", record(models=("x",)), S.READY, "replace"),
    ("limit changed", record(max_running_requests=1), S.READY, "replace"),
    ("a model's slots changed", record(model_slots={"m": 1, "n": 1}), S.READY, "replace"),
    ("per-model slots lost", record(model_slots={}), S.READY, "replace"),
    ("labels changed", record(labels={}), S.READY, "replace"),
    ("failed by someone", record(status=S.FAILED), S.READY, "replace"),
    ("operator's drain stays", record(status=S.DRAINING), S.READY, None),
    ("not ready: the heartbeat's job", record(status=S.NOT_READY), S.READY, None),
    ("pending: the heartbeat's job", record(status=S.PENDING), S.READY, None),
    ("our drain undone", record(status=S.READY), S.DRAINING, "drain"),
    ("draining as chosen", record(status=S.DRAINING), S.DRAINING, None),
    ("spec first, then drain", record(status=S.READY, models=("x",)), S.DRAINING, "replace"),
]


@pytest.mark.parametrize(
    ("current", "chosen", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_repair(
    current: WorkerRecord | None, chosen: WorkerStatus, expected: Repair | None
) -> None:
    assert repair(current, SPEC, chosen) == expected
