"""The registry's worker records and their URL and model indexes. Pure, no I/O.

Invariants (checked by tests/unit/test_registry_props.py after every operation):
1. url_index maps each record's url to its id and nothing else (URL uniqueness).
2. model_index[m] is exactly the set of ids whose record serves m; no empty entries.
"""

from __future__ import annotations

from schemas.registry import WorkerRecord

# The principal of operators and the admin API, and the owner of the records they create.
OPERATOR = ""
# A worker labelled this way is never expired for missing heartbeats (an external server that an
# operator registered by hand and manages itself).
HEARTBEAT_LABEL = "switchboard.heartbeat"


class RecordIndex:
    """All worker records by id, plus which id holds each URL and which ids serve each model."""

    def __init__(self) -> None:
        self.records: dict[str, WorkerRecord] = {}
        self.url_index: dict[str, str] = {}
        self.model_index: dict[str, set[str]] = {}

    def reindex(self, records: list[WorkerRecord]) -> None:
        """Replace every record (a load from KV)."""
        self.records, self.url_index, self.model_index = {}, {}, {}
        for record in records:
            self._index(record)

    def put(self, new: WorkerRecord) -> None:
        """Add a record, or replace the one with its id in place."""
        old = self.records.get(new.id)
        if old is None:
            self._index(new)
        else:
            self._swap(old, new)

    def drop(self, worker_id: str) -> None:
        self._unindex(self.records[worker_id])

    def sorted_records(self, model: str | None = None) -> tuple[WorkerRecord, ...]:
        """Every record, or those serving `model`, by id."""
        ids = self.records if model is None else self.model_index.get(model, set())
        return tuple(sorted((self.records[i] for i in ids), key=lambda r: r.id))

    def _index(self, record: WorkerRecord) -> None:
        self.records[record.id] = record
        self.url_index[record.url] = record.id
        for model in record.models:
            self.model_index.setdefault(model, set()).add(record.id)

    def _unindex(self, record: WorkerRecord) -> None:
        del self.records[record.id]
        if self.url_index.get(record.url) == record.id:
            del self.url_index[record.url]
        for model in record.models:
            self._drop_model(model, record.id)

    def _drop_model(self, model: str, worker_id: str) -> None:
        ids = self.model_index.get(model)
        if ids is not None:
            ids.discard(worker_id)
            if not ids:
                del self.model_index[model]

    def _swap(self, old: WorkerRecord, new: WorkerRecord) -> None:
        """Replace in place: the model index is diffed so a kept model is never briefly absent."""
        self.records[new.id] = new
        if old.url != new.url:
            del self.url_index[old.url]
            self.url_index[new.url] = new.id
        for model in set(new.models) - set(old.models):
            self.model_index.setdefault(model, set()).add(new.id)
        for model in set(old.models) - set(new.models):
            self._drop_model(model, old.id)
