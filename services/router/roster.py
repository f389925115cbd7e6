"""Who serves which model, from the registry's records, counted once per change. Pure, no I/O."""

from __future__ import annotations

from collections import Counter

from schemas.registry import WorkerRecord, WorkerStatus


class Roster:
    """The records by model (in the records' order), and the counts requests and /health read."""

    def __init__(self, records: dict[str, WorkerRecord] | None = None) -> None:
        self.serving: dict[str, dict[str, WorkerRecord]] = {}
        self.ready_of: Counter[str] = Counter()
        self.pending_of: Counter[str] = Counter()
        self.ready = 0
        for record in (records or {}).values():
            models = dict.fromkeys(record.models)  # a model listed twice counts once
            for model in models:
                self.serving.setdefault(model, {})[record.id] = record
            self._count(record, 1)
        self.models = sorted(self.ready_of)  # served by at least one Ready worker

    def replace(self, old: WorkerRecord | None, new: WorkerRecord | None) -> None:
        """One record added (old None), changed, or removed (new None): O(its models), except
        that a model whose set of workers changes gets a new dict (copied, O(its workers)):
        the choice's columns (vector.py) notice a changed set by the dict's identity."""
        record = new if new is not None else old
        if record is None:
            return
        worker_id = record.id
        old_models = dict.fromkeys(old.models) if old is not None else {}
        new_models = dict.fromkeys(new.models) if new is not None else {}
        for model in old_models.keys() - new_models.keys():
            left = {w: r for w, r in self.serving[model].items() if w != worker_id}
            if left:
                self.serving[model] = left
            else:
                del self.serving[model]
        for model in new_models:
            assert new is not None
            serving = self.serving.get(model)
            if serving is not None and worker_id in serving:
                serving[worker_id] = new  # same set: in place, its place in the order kept
            else:
                self.serving[model] = {**(serving or {}), worker_id: new}
        if old is not None:
            self._count(old, -1)
        if new is not None:
            self._count(new, 1)
        self.models = sorted(self.ready_of)

    def _count(self, record: WorkerRecord, step: int) -> None:
        models = dict.fromkeys(record.models)
        if record.status == WorkerStatus.READY:
            self.ready += step
            counts = self.ready_of
        elif record.status == WorkerStatus.PENDING:
            counts = self.pending_of
        else:
            return
        for model in models:
            counts[model] += step
            if counts[model] <= 0:
                del counts[model]  # models() lists only those some Ready worker serves

    def ready_left(self, model: str, exclude: frozenset[str]) -> int:
        """Ready workers serving the model, less those in `exclude`."""
        serving = self.serving.get(model, {})
        left = self.ready_of[model]
        for worker_id in exclude:
            record = serving.get(worker_id)
            if record is not None and record.status == WorkerStatus.READY:
                left -= 1
        return left
