"""Worker decisions: its registry record, its heartbeat, its measured rates, its prefix-cache
events, a busy or failed request's error. Pure, no I/O.

The shell (shell.py, http.py) reads the engines and the admission cores, asks here, and acts;
how one OpenAI request becomes an engine's parameters (or its refusal) is shaping.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import msgspec

from schemas.inference import ChatCompletionRequest, CompletionRequest
from schemas.load import ModelLoad, WorkerLoad
from schemas.prefix import block_hashes, chat_text, utf8
from schemas.registry import WorkerRecord, WorkerSpec, WorkerStatus
from services.admission.core import Admission, Busy
from services.common.errors import ApiError, at_capacity

# ---- the registry record ----

Repair = Literal["register", "replace", "drain"]


def worker_spec(url: str, slots: Mapping[str, int], labels: Mapping[str, str]) -> WorkerSpec:
    """What the worker registers: its models, each one's slots, and their sum (the old total)."""
    return WorkerSpec(
        url=url,
        models=tuple(slots),
        max_running_requests=sum(slots.values()),
        model_slots=dict(slots),
        labels=dict(labels),
    )


def spec_of(record: WorkerRecord) -> WorkerSpec:
    """The spec a record was written from (the record minus the registry's bookkeeping)."""
    return WorkerSpec(
        url=record.url,
        models=record.models,
        max_running_requests=record.max_running_requests,
        model_slots=record.model_slots,
        labels=record.labels,
    )


def repair(record: WorkerRecord | None, spec: WorkerSpec, chosen: WorkerStatus) -> Repair | None:
    """What puts our record right when someone else changed it (None: nothing to do).

    The worker knows what it serves: a missing record is registered again; a changed spec, or
    Failed (left only through Pending), is replaced by ours. Its own Draining is restored. It never
    undoes a status it did not choose otherwise: an operator's drain stays, and Pending/NotReady
    are its heartbeats' business (a `ready` heartbeat makes them Ready).
    """
    if record is None:
        return "register"
    if spec_of(record) != spec or record.status == WorkerStatus.FAILED:
        return "replace"
    if chosen == WorkerStatus.DRAINING and record.status != WorkerStatus.DRAINING:
        return "drain"
    return None


# ---- what a model's finished requests measured ----

EWMA_WEIGHT = 0.2  # the newest request's share: recent requests weigh most, one outlier little


class Ewma:
    """Exponentially weighted mean; None until the first sample."""

    def __init__(self, weight: float = EWMA_WEIGHT) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"an EWMA weight is in (0, 1], not {weight}")
        self.weight = weight
        self.value: float | None = None

    def add(self, sample: float) -> None:
        old = self.value
        self.value = sample if old is None else old + self.weight * (sample - old)


class Measured(msgspec.Struct, frozen=True, kw_only=True):
    """One request, once its slot is given back (times from the shell's clock)."""

    held_s: float | None  # how long it held its slot; None: it did not finish (client left)
    ttft_s: float | None  # slot to first token; None: no token came
    prompt_tokens: int
    cached_tokens: int = 0  # of those, served from the prefix cache (not prefilled)
    prefix_blocks: int = 0  # blocks looked up in the prefix cache (0: no lookup, no cache)
    prefix_hits: int = 0


MIN_PREFILL_SAMPLE = 64  # tokens: about one prompt block (schemas/prefix.py)


class ModelStats:
    """One model's rates and prefix-cache counters, as the heartbeat reports them."""

    def __init__(self, weight: float = EWMA_WEIGHT) -> None:
        self.service_s = Ewma(weight)
        self.prefill_tokens_per_s = Ewma(weight)
        self.prefix_lookups = 0  # in blocks, as vLLM counts its prefix-cache queries in tokens
        self.prefix_hits = 0

    def add(self, m: Measured) -> None:
        if m.held_s is not None:
            self.service_s.add(max(m.held_s, 0.0))
        prefilled = m.prompt_tokens - m.cached_tokens
        if m.ttft_s is not None and m.ttft_s > 0 and prefilled >= MIN_PREFILL_SAMPLE:
            # the tokens it had to prefill: the rate the router divides its uncached tokens by.
            # A short prompt is all fixed overhead (2 tokens measured 136 tokens/s), which would
            # make long prompts look slow: only prompts of a block or more are samples.
            self.prefill_tokens_per_s.add(prefilled / m.ttft_s)
        self.prefix_lookups += m.prefix_blocks
        self.prefix_hits += m.prefix_hits

    def report(self, load: ModelLoad) -> ModelLoad:
        return msgspec.structs.replace(
            load,
            service_s=self.service_s.value,
            prefill_tokens_per_s=self.prefill_tokens_per_s.value,
            prefix_lookups=self.prefix_lookups,
            prefix_hits=self.prefix_hits,
        )


# ---- what the heartbeat and /health report ----

Stats = Mapping[str, ModelStats]


def slots(admissions: Mapping[str, Admission]) -> dict[str, int]:
    """Each served model's running slots (its gate's max_in_flight)."""
    return {name: a.limits.max_in_flight for name, a in admissions.items()}


def backlog(admissions: Mapping[str, Admission]) -> int:
    """Requests still running or queued, over every model (what a drain waits for)."""
    return sum(a.in_flight + a.queue_depth for a in admissions.values())


def model_loads(
    admissions: Mapping[str, Admission], stats: Stats | None = None
) -> tuple[ModelLoad, ...]:
    """Each model's admission state, with what its requests measured (when given)."""
    stats = stats or {}
    loads = []
    for name, a in admissions.items():
        load = a.load(name)
        measured = stats.get(name)
        loads.append(load if measured is None else measured.report(load))
    return tuple(loads)


def worker_load(
    worker_id: str,
    url: str,
    status: WorkerStatus,
    interval_s: float,
    admissions: Mapping[str, Admission],
    stats: Stats | None = None,
) -> WorkerLoad:
    """One heartbeat's body: the worker's status and every model's load and rates."""
    return WorkerLoad(
        worker_id=worker_id,
        url=url,
        models=model_loads(admissions, stats),
        status=status,
        heartbeat_interval_s=interval_s,
    )


class WorkerHealth(msgspec.Struct, frozen=True, kw_only=True):
    status: str  # "ready" | "draining"
    models: tuple[ModelLoad, ...]


def health(
    admissions: Mapping[str, Admission], stats: Stats | None = None
) -> tuple[int, WorkerHealth]:
    """/health: the heartbeat's numbers; 503 once draining (peer routers then stop sending)."""
    draining = any(a.draining for a in admissions.values())
    body = WorkerHealth(
        status="draining" if draining else "ready", models=model_loads(admissions, stats)
    )
    return (503 if draining else 200), body


# ---- the prefix cache's blocks ----


def prompt_blocks(req: ChatCompletionRequest | CompletionRequest) -> tuple[int, ...]:
    """The request's prompt blocks, named as the router names them (schemas/prefix.py)."""
    if isinstance(req, ChatCompletionRequest):
        return block_hashes(chat_text((m.role, m.text()) for m in req.messages))
    return block_hashes(utf8(req.prompt_text()))


# ---- the outcomes the edge answers with ----


def not_served(model: str, served: Iterable[str]) -> ApiError:
    return ApiError(
        status=404,
        message=f"model {model!r} is not served here (serving: {', '.join(sorted(served))})",
        type="invalid_request_error",
        code="model_not_found",
        param="model",
    )


def busy(model: str, refused: Busy) -> ApiError:
    """The model's gate refused: the one busy 503 (Retry-After from its measured service time)."""
    return at_capacity("worker", model, refused.reason, refused.retry_after_s)


def engine_failed(why: str) -> ApiError:
    return ApiError(
        status=500, message=f"generation failed: {why}", type="server_error", code="engine_error"
    )
