"""One exllamav2 job's bookkeeping: sampler settings, stops, penalties, grammar filter, chunks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from services.worker.engines import guides, penalties
from services.worker.engines.base import Chunk, SamplingParams


def sampler_settings(params: SamplingParams) -> dict[str, float | int]:
    """exllamav2 Sampler.Settings arguments for a request: what it asked for and nothing else.

    exllamav2's own defaults (temperature 0.8, top_k 50, top_p 0.8, repetition penalty 1.025)
    are a chat UI's taste, not the OpenAI API's, and would make the GPU engine answer differently
    from the CPU one; so every one of them is set. top_k 0 and top_p 1.0 switch those filters
    off in exllamav2's sampler; temperature 0 is greedy (its Settings.greedy()). min_p is
    applied after top-k and top-p there, as in engines/logprobs.py's rule.

    repetition_penalty maps onto exllamav2's own over the whole sequence (range -1, no decay:
    prompt and completion, as penalties.py). Its frequency and presence penalties stay 0: they
    count the prompt's tokens too, OpenAI's do not, so CompletionPenalty does them through the
    job's token_bias instead, as it does logit_bias (see needs_bias).
    """
    penalty: dict[str, float | int] = {
        "token_repetition_penalty": params.repetition_penalty,
        "token_repetition_range": -1,
        "token_repetition_decay": 0,
        "token_frequency_penalty": 0.0,
        "token_presence_penalty": 0.0,
    }
    if params.temperature == 0:
        return {"temperature": 1.0, "top_k": 1, "top_p": 0.0, "min_p": 0.0, **penalty}
    return {
        "temperature": params.temperature,
        # min_p 1 keeps only the likeliest token; exllamav2 reads min_p >= 1 as off
        "top_k": 1 if params.min_p >= 1.0 else params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p if params.min_p < 1.0 else 0.0,
        **penalty,
    }


def stop_conditions(params: SamplingParams, eos: int) -> list[int | str]:
    """The job's stop_conditions: the end token (unless ignore_eos; under a grammar, whose end
    is the end token, it stays), vLLM's stop_token_ids, the stop strings. exllamav2 cannot
    sample the tokens among them before min_new_tokens (min_tokens) are generated."""
    ends = [] if params.ignore_eos and params.constraint is None else [eos]
    return [*ends, *params.stop_token_ids, *params.stop]


def needs_bias(params: SamplingParams) -> bool:
    """Whether a job needs a token_bias tensor (logit_bias, or OpenAI's completion penalties)."""
    return bool(params.logit_bias or params.frequency_penalty or params.presence_penalty)


class CompletionPenalty:
    """OpenAI's frequency and presence penalties for one job, as changes to its token_bias.

    After every generator step the tokens the job's sequence gained past the prompt are taken,
    and each lowers its own bias by penalties.completion_penalty; exllamav2's sampler adds the
    bias to the next step's logits, so the sum is exactly penalties.py's step 2.
    """

    def __init__(self, params: SamplingParams, prompt_tokens: int) -> None:
        self.params = params
        self.done = prompt_tokens  # sequence positions already accounted for
        self.counts: dict[int, int] = {}

    def take(self, new_tokens: Sequence[int]) -> dict[int, float]:
        """Bias changes (token -> amount to add) for tokens that follow those taken so far."""
        changes: dict[int, float] = {}
        for t in new_tokens:
            before = self.counts.get(t, 0)
            changes[t] = changes.get(t, 0.0) - penalties.completion_penalty(before, self.params)
            self.counts[t] = before + 1
        self.done += len(new_tokens)
        return changes


class GuideFilter:
    """A grammar as exllamav2's filter interface wants it (mixed into its ExLlamaV2Filter by
    exl2.py): the mask is prepared on exllamav2's filter thread while the GPU runs the forward
    pass, and applied to the logits after its penalties and token_bias, before temperature,
    top-k and top-p. Once the grammar is complete only the end token is allowed, so the job ends
    on it ("stop"). A token the grammar refuses (it never should) is kept in `error`, and the
    loop fails that job alone."""

    def __init__(self, guide: guides.Guide, width: int) -> None:
        self.guide = guide
        self.width = width  # the logits' width (the head's padding is never allowed)
        self.error = ""
        self._allowed: bytes = b""

    def begin(self, prefix_str: str) -> None:
        return None  # a fresh guide per job: nothing to rewind

    def feed(self, token: Any) -> None:
        if not self.error and not self.guide.advance(int(token)):
            self.error = f"the grammar refused a token it allowed: {self.guide.error}"

    def use_background_worker(self) -> bool:
        return True

    def can_mask_logits(self) -> bool:
        return True

    def prepare_logit_mask(self) -> bool:
        self._allowed = self.guide.allowed()
        return True

    def mask_logits(self, logits: Any) -> Any:
        import torch

        ok = torch.frombuffer(bytearray(self._allowed[: self.width]), dtype=torch.uint8)
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        keep[: ok.numel()] = ok.bool()
        return logits.masked_fill_(~keep.to(logits.device), float("-inf"))

    def next(self) -> tuple[set[int], set[int]]:
        """exllamav2's other path (when it cannot mask: batched CFG): the allowed ids."""
        allowed = self.guide.allowed()
        return {t for t in range(min(len(allowed), self.width)) if allowed[t]}, set()


def filter_error(exjob: Any) -> str:
    """Why a job's grammar filter failed ("" when it has not, or the job has none)."""
    return next(
        (f.error for f in getattr(exjob, "filters", ()) or () if getattr(f, "error", "")), ""
    )


def chunk_for(
    result: Mapping[str, Any], counted: int, include_stop: bool = False
) -> tuple[Chunk | None, int]:
    """One generator result for a job as (the chunk to push or None, tokens counted so far).

    Token counts come from the result's token_ids; the final result's new_tokens is the job's
    true total, so the last chunk carries whatever the streamed ones did not (usage adds up).
    include_stop: vLLM's include_stop_str_in_output (the text keeps what ended it).
    """
    if result.get("stage") != "streaming":
        return None, counted
    ids = result.get("token_ids")
    n = 0 if ids is None else int(ids.shape[-1])
    text = str(result.get("text", ""))
    if result.get("eos"):
        total = int(result.get("new_tokens", counted + n))
        reason = "length" if result.get("eos_reason") == "max_new_tokens" else "stop"
        if include_stop:
            text += stop_text(result)
        return Chunk(text=text, tokens=max(total - counted, 0), finish_reason=reason), total
    if text or n:
        return Chunk(text=text, tokens=n), counted + n
    return None, counted


def stop_text(result: Mapping[str, Any]) -> str:
    """What ended a job, as include_stop_str_in_output keeps it: the stop string exllamav2
    matched, or after a stop token the text it held back, which ends with that token's
    (decoded as the job's decode_special_tokens says: an end token's is "" unless asked)."""
    reason = result.get("eos_reason")
    if reason == "stop_string":
        return str(result.get("eos_triggering_string", ""))
    if reason == "stop_token":
        held = result.get("held")
        return str(held.get("text", "")) if isinstance(held, Mapping) else ""
    return ""
