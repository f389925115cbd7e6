"""Hugging Face transformers engine for CPU: batch-1 token loop on its own thread.

Imported only when chosen (torch and transformers are heavy). Loads from a local directory only
(HF_HUB_OFFLINE=1, local_files_only): no hub access at run time. Structured output: llguidance's
mask (guides.py) sets the logits of tokens the grammar forbids to -inf after the penalties.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from schemas.inference import ChatMessage
from services.common.errors import ConfigError
from services.worker.engines import guides, penalties
from services.worker.engines.base import (
    CANCELLED,
    Chunk,
    EngineError,
    EngineLimits,
    Job,
    SamplingParams,
)
from services.worker.engines.demo_model import is_model_dir
from services.worker.engines.hf_logits import (
    ban,
    distribution,
    penalize,
    sample,
    stop_tokens,
    torch_topk,
)

# re-exported (the `as` form): bench/grammar_peers.py times it as hf.constrain
from services.worker.engines.hf_logits import constrain as constrain
from services.worker.engines.logprobs import StepLogprobs, TokenLogprob, byte_level
from services.worker.engines.memory import available_ram_bytes, checkpoint_bytes, require_room
from services.worker.engines.stops import StopScanner
from services.worker.engines.template import DEFAULT_OPTIONS, ChatOptions, TemplateFailed

_STOP = object()


class TransformersEngine:
    def __init__(self, model_dir: Path, model_id: str, max_context: int | None = None) -> None:
        self.model_dir = model_dir
        self.model_id = model_id
        self._max_context = max_context
        self.limits = EngineLimits(max_batch=1, max_context=max_context or 2048)
        self.vocab_size = 0  # known once loaded
        self.running = 0
        self.peak_running = 0
        self.steps = 0  # forward passes done (tests watch it stop after a cancel)
        self._model: Any = None
        self._tokenizer: Any = None
        self._cache_kwarg = "cache"
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._grammars: guides.Grammars | None = None  # built on the engine thread when needed

    async def load(self) -> None:
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._serve, name=f"hf-{self.model_id}", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        if not is_model_dir(self.model_dir):
            raise ConfigError(
                f"config error in field 'model_dir': {self.model_dir} is not a model directory "
                "(needs config.json and *.safetensors)"
            )
        # fp16 on disk becomes fp32 on the CPU: twice the bytes, plus headroom for activations.
        require_room(
            int(checkpoint_bytes(self.model_dir) * 2.2),
            available_ram_bytes(),
            "RAM",
            self.model_dir,
        )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self._model = AutoModelForCausalLM.from_pretrained(
            str(self.model_dir), local_files_only=True, dtype=torch.float32
        ).eval()
        self._cache_kwarg = cache_kwarg(self._model)
        context = int(getattr(self._model.config, "max_position_embeddings", 2048))
        self.limits = EngineLimits(max_batch=1, max_context=self._max_context or context)
        self.vocab_size = int(self._model.config.vocab_size)  # the logits' width

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def _encode(self, text: str) -> list[int]:
        # The chat template writes its own special tokens; adding more would change the prompt.
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def chat_prompt(
        self, messages: Sequence[ChatMessage], options: ChatOptions = DEFAULT_OPTIONS
    ) -> str:
        try:
            rendered = self._tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text()} for m in messages],
                tokenize=False,
                add_generation_prompt=options.add_generation_prompt,
                continue_final_message=options.continue_final_message,
                **options.variables,
            )
        except ValueError as exc:  # e.g. a final message the template does not write
            raise TemplateFailed(str(exc)) from None
        return str(rendered)

    def start(self, prompt: str, params: SamplingParams) -> Job:
        ids = self._encode(prompt)
        job = Job(prompt_tokens=len(ids))
        self._queue.put((job, ids, params))
        return job

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            job, ids, params = item
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
            try:
                self._generate(job, ids, params)
            except Exception as exc:  # the job fails; the engine thread lives on
                job.push(EngineError.of(exc))
            finally:
                self.running -= 1

    def _generate(self, job: Job, ids: list[int], params: SamplingParams) -> None:
        import torch
        from transformers import DynamicCache

        eos = self._model.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        guide = None if params.constraint is None else self._guide(params.constraint, eos_ids)
        ending = stop_tokens(params, eos_ids, constrained=guide is not None)
        rng = torch.Generator().manual_seed(
            params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "big")
        )
        scanner = StopScanner(params.stop, params.include_stop_str_in_output)
        generated: list[int] = []
        emitted = ""
        # One cache per job, owned here and grown in place by every forward pass: nothing is read
        # back from the output (its cache attribute changed name across releases too).
        cache = DynamicCache(config=self._model.config)
        step_input = torch.tensor([ids], dtype=torch.long)
        with torch.inference_mode():
            for i in range(params.max_tokens):
                if job.cancelled:
                    job.push(CANCELLED)
                    return
                out = self._model(
                    input_ids=step_input, use_cache=True, **{self._cache_kwarg: cache}
                )
                self.steps += 1
                logits = out.logits[0, -1]
                if penalties.active(params):
                    logits = penalize(logits, ids, generated, params)
                if len(generated) < params.min_tokens:  # the tokens that would end it: not yet
                    logits = ban(logits, ending)
                if guide is not None:
                    logits = constrain(logits, guide.allowed())
                token = sample(logits, params, rng)
                step_input = torch.tensor([[token]], dtype=torch.long)
                if token in ending:
                    # its text (an end token's is "" unless skip_special_tokens is false) only
                    # when include_stop_str_in_output keeps it
                    kept = ""
                    if params.include_stop_str_in_output:
                        whole = self._decoded([*generated, token], params)
                        kept = scanner.feed("" if whole is None else whole[len(emitted) :])
                    job.push(Chunk(text=kept + scanner.flush(), tokens=1, finish_reason="stop"))
                    return
                if guide is not None and not guide.advance(token):
                    raise EngineError(f"the grammar refused a token it allowed: {guide.error}")
                lp = () if params.logprobs is None else (self._logprobs(logits, params, token),)
                generated.append(token)
                text = self._decoded(generated, params)
                if text is None:  # an incomplete UTF-8 sequence: wait for more bytes
                    piece = ""
                else:
                    piece, emitted = text[len(emitted) :], text
                out_text = scanner.feed(piece)
                if scanner.stopped:
                    job.push(Chunk(text=out_text, tokens=1, finish_reason="stop", logprobs=lp))
                    return
                if guide is not None and guide.done:  # nothing may follow: complete
                    text = out_text + scanner.flush()
                    job.push(Chunk(text=text, tokens=1, finish_reason="stop", logprobs=lp))
                    return
                if i + 1 == params.max_tokens:
                    text = out_text + scanner.flush()
                    job.push(Chunk(text=text, tokens=1, finish_reason="length", logprobs=lp))
                    return
                job.push(Chunk(text=out_text, tokens=1, logprobs=lp))

    def _decoded(self, generated: list[int], params: SamplingParams) -> str | None:
        """The generated tokens' text; None while it ends in an incomplete UTF-8 sequence."""
        text = self._tokenizer.decode(generated, skip_special_tokens=params.skip_special_tokens)
        return None if text.endswith("\ufffd") else str(text)

    def _guide(self, constraint: guides.Constraint, eos_ids: set[int]) -> guides.Guide:
        """A fresh grammar state (the tokenizer is read once, about 1 s for 128k tokens)."""
        if self._grammars is None:
            llt = guides.hf_tokenizer(self._tokenizer, eos=sorted(eos_ids))
            self._grammars = guides.Grammars(llt)
        try:
            return self._grammars.guide(constraint)
        except guides.GrammarError as exc:
            raise EngineError(f"the constraint does not compile: {exc}") from None

    def _logprobs(self, logits: Any, params: SamplingParams, token: int) -> StepLogprobs:
        """The sampled token's logprob and its step's top alternatives (engines/logprobs.py)."""

        def one(t: int, logprob: float) -> TokenLogprob:
            text, utf8 = self._describe(t)
            return TokenLogprob(token=text, utf8=utf8, logprob=logprob)

        dist = distribution(logits, params)
        top = torch_topk(dist, params.logprobs or 0)
        return StepLogprobs(
            chosen=one(token, float(dist[token])), top=tuple(one(t, lp) for t, lp in top)
        )

    def _describe(self, token: int) -> tuple[str, bytes]:
        """A token's text and its bytes: a token that is part of a UTF-8 character decodes to
        U+FFFD, so its bytes come from its stored name (byte-level BPE) when they can."""
        text = str(self._tokenizer.decode([token], skip_special_tokens=False))
        if "\ufffd" in text:
            piece = self._tokenizer.convert_ids_to_tokens(token)
            raw = byte_level(piece) if isinstance(piece, str) else None
            if raw is not None:
                return text, raw
        return text, text.encode("utf-8", "surrogatepass")

    async def close(self) -> None:
        self._queue.put(_STOP)


def cache_kwarg(model: Any) -> str:
    """The forward() keyword that takes the KV cache: `cache` from transformers 5.24 on.

    Older releases call it `past_key_values` (5.24 still accepts that, with a FutureWarning, until
    5.40). Passing `cache` to an older model would not fail: its **kwargs would swallow it and
    every step would run without context, so the name is read from the signature.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
