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
            if record.status == WorkerStatus.READY:
                self.ready += 1
                self.ready_of.update(models.keys())
            elif record.status == WorkerStatus.PENDING:
                self.pending_of.update(models.keys())
        self.models = sorted(self.ready_of)  # served by at least one Ready worker

    def ready_left(self, model: str, exclude: frozenset[str]) -> int:
        """Ready workers serving the model, less those in `exclude`."""
        serving = self.serving.get(model, {})
        left = self.ready_of[model]
        for worker_id in exclude:
            record = serving.get(worker_id)
            if record is not None and record.status == WorkerStatus.READY:
                left -= 1
        return left
