"""Worker decisions: its registry record, its heartbeat, its measured rates, its prefix-cache
events, how a request is shaped. Pure, no I/O.

The shell (shell.py, http.py) reads the engines and the admission cores, asks here, and acts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, TypeVar

import msgspec

from schemas.inference import ChatCompletionRequest, CompletionRequest, SamplingFields
from schemas.load import ModelLoad, WorkerLoad
from schemas.prefix import block_hashes, chat_text, utf8
from schemas.registry import WorkerRecord, WorkerSpec, WorkerStatus
from services.admission.core import Admission, Busy
from services.common.errors import ApiError, at_capacity, invalid
from services.worker import tools
from services.worker.engines import grammar
from services.worker.engines.params import EngineLimits, SamplingParams
from services.worker.engines.penalties import BadBias, parse_bias
from services.worker.engines.template import IMAGE_PART, refused_part

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


# ---- shaping one OpenAI request ----

Num = TypeVar("Num", int, float)


def not_served(model: str, served: Iterable[str]) -> ApiError:
    return ApiError(
        status=404,
        message=f"model {model!r} is not served here (serving: {', '.join(sorted(served))})",
        type="invalid_request_error",
        code="model_not_found",
        param="model",
    )


def unsupported(req: SamplingFields) -> ApiError | None:
    """A feature no engine here has is refused by name, never answered as if not asked."""
    param = req.unsupported()
    if param is None:
        return None
    return invalid(
        f"{param} is not supported here; remove it or send its default "
        "(0, null or false) and the request will be served",
        "unsupported_parameter",
        param,
    )


def refused_content(req: ChatCompletionRequest, accepts_images: bool) -> ApiError | None:
    """The first content part the model cannot take (refused rather than dropped)."""
    refused = refused_part(req.messages, accepts_images)
    if refused is None:
        return None
    where, kind = refused
    takes = f"text and {IMAGE_PART}" if accepts_images else "text"
    return invalid(
        f"{where} is a {kind!r} part; model {req.model} takes only {takes} parts",
        "unsupported_content",
        where,
    )


def logit_bias(req: SamplingFields, vocab_size: int) -> tuple[tuple[int, float], ...] | ApiError:
    """OpenAI's {"<token id>": bias} as sorted (id, bias) pairs, or the refusal naming the key."""
    try:
        return parse_bias(req.logit_bias, vocab_size)
    except BadBias as exc:
        return invalid(str(exc), "invalid_value", "logit_bias")


def sampling(
    req: SamplingFields,
    prompt_tokens: int,
    limits: EngineLimits,
    vocab_size: int,
    default_max_tokens: int = 0,
) -> SamplingParams | ApiError:
    """The engine's parameters for a prompt of prompt_tokens, or why it cannot be served.

    No max_tokens: the rest of the context (OpenAI's default), at most default_max_tokens if set.
    A field sent as null takes its default (OpenAI's meaning of null).
    """
    wanted = max_tokens(req, prompt_tokens, limits.max_context, default_max_tokens)
    if isinstance(wanted, ApiError):
        return wanted
    bias = logit_bias(req, vocab_size)
    if isinstance(bias, ApiError):
        return bias
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs and not req.logprobs:
        # as OpenAI answers it: alternatives of nothing
        return invalid("top_logprobs needs logprobs: true", param="top_logprobs")
    constraint = grammar.requested(req.constraint_fields())  # response_format, guided_*, ...
    if isinstance(constraint, grammar.Problem):
        return invalid(constraint.message, "invalid_value", constraint.param)
    why = cannot_constrain(req, constraint, limits) or ends(req, wanted, constraint, vocab_size)
    if why is not None:
        return why
    return SamplingParams(
        max_tokens=wanted,
        temperature=_or(req.temperature, 1.0),
        top_p=_or(req.top_p, 1.0),
        top_k=_or(req.top_k, 0),
        min_p=_or(req.min_p, 0.0),
        seed=req.seed,
        stop=req.stop_strings(),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        min_tokens=_or(req.min_tokens, 0),
        ignore_eos=bool(req.ignore_eos),
        presence_penalty=_or(req.presence_penalty, 0.0),
        frequency_penalty=_or(req.frequency_penalty, 0.0),
        repetition_penalty=_or(req.repetition_penalty, 1.0),
        logit_bias=bias,
        logprobs=req.wanted_logprobs(),
        constraint=constraint,
    )


def _or(value: Num | None, default: Num) -> Num:
    return default if value is None else value


def max_tokens(
    req: SamplingFields, prompt_tokens: int, context: int, default_max_tokens: int
) -> int | ApiError:
    """The tokens the completion may take, or why the prompt (or max_tokens) does not fit."""
    if isinstance(req, ChatCompletionRequest):
        cap, prompt_param = req.max_completion_tokens or req.max_tokens, "messages"
    else:
        cap, prompt_param = req.max_tokens, "prompt"
    room = context - prompt_tokens
    if room <= 0:  # not one token of room: the prompt is at fault, whatever max_tokens says
        return invalid(
            f"the prompt ({prompt_tokens} tokens) leaves no room in the model's context of "
            f"{context} tokens",
            "context_length_exceeded",
            prompt_param,
        )
    wanted = cap if cap is not None else min(default_max_tokens or room, room)
    if wanted > room:
        return invalid(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({wanted}) exceeds the "
            f"model's context of {context} tokens",
            "context_length_exceeded",
            "max_tokens",
        )
    return wanted


def cannot_constrain(
    req: SamplingFields, constraint: grammar.Constraint | None, limits: EngineLimits
) -> ApiError | None:
    """A constraint (or a forced tool call) the engine cannot enforce, refused by name."""
    if limits.constrains_output:
        return None
    if constraint is not None:
        param = constraint.param
    elif isinstance(req, ChatCompletionRequest) and tools.forces(req):
        param = "tool_choice"
    else:
        return None
    return invalid(
        f"{param}: this model cannot constrain its output here (its checkpoint has no "
        "tokenizer.json); send it without an output constraint",
        "unsupported_parameter",
        param,
    )


def ends(
    req: SamplingFields, wanted: int, constraint: grammar.Constraint | None, vocab_size: int
) -> ApiError | None:
    """What is wrong with vLLM's stop_token_ids and min_tokens, if anything."""
    for token in req.stop_token_ids or ():
        if token >= vocab_size:
            message = (
                f"stop_token_ids: {token} is not a token id of this model (0..{vocab_size - 1})"
            )
            return invalid(message, "invalid_value", "stop_token_ids")
    least = req.min_tokens or 0
    if least and len(set(req.stop_token_ids or ())) >= vocab_size:
        message = "min_tokens with every token in stop_token_ids leaves nothing to generate"
        return invalid(message, "invalid_value", "min_tokens")
    if least > wanted:
        message = f"min_tokens ({least}) must be at most max_tokens ({wanted})"
        return invalid(message, "invalid_value", "min_tokens")
    # vLLM holds stop strings back until min_tokens too, exllamav2 does not; and a grammar's end
    # cannot wait. Refused rather than served differently on one engine.
    clash = "stop" if req.stop_strings() else None if constraint is None else constraint.param
    if least and clash is not None:
        return invalid(
            f"min_tokens cannot be combined with {clash} here",
            "unsupported_parameter",
            "min_tokens",
        )
    return None


def busy(model: str, refused: Busy) -> ApiError:
    """The model's gate refused: the one busy 503 (Retry-After from its measured service time)."""
    return at_capacity("worker", model, refused.reason, refused.retry_after_s)


def engine_failed(why: str) -> ApiError:
    return ApiError(
        status=500, message=f"generation failed: {why}", type="server_error", code="engine_error"
    )
