"""exllamav2 engine on CUDA: the dynamic generator (continuous batching) on its own thread.

The only module that imports exllamav2 or touches CUDA, and only when chosen. The generator runs
on exl2_loop's thread; the event loop only hands jobs over and receives chunks through Job.push.
Paged mode (true continuous batching) needs flash-attn >= 2.5.7; without it exllamav2's unpaged
fallback runs one job at a time, max_batch (what admission and capacity use) says so, and the
log warns. Structured output: llguidance (guides.py) through exllamav2's filter hook
(exl2_jobs.GuideFilter), with the tokenizer read from the checkpoint's tokenizer.json (a checkpoint
without one: limits.constrains_output is False, and such requests are refused).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from schemas.inference import ChatMessage
from services.common.errors import ConfigError
from services.worker.engines import guides
from services.worker.engines.base import EngineLimits, Job, SamplingParams
from services.worker.engines.demo_model import is_model_dir
from services.worker.engines.exl2_jobs import (
    GuideFilter,
    needs_bias,
    sampler_settings,
    stop_conditions,
)
from services.worker.engines.exl2_logprobs import job_options
from services.worker.engines.exl2_loop import GeneratorLoop
from services.worker.engines.memory import checkpoint_bytes, require_room
from services.worker.engines.template import DEFAULT_OPTIONS, ChatOptions, ChatTemplate

log = logging.getLogger(__name__)
PAGE = 256  # exllamav2's page size; cache lengths are multiples of it


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def cuda_ready() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    try:
        import exllamav2  # noqa: F401
    except Exception as exc:  # a failed JIT build raises all sorts of errors
        return False, f"exllamav2 does not import: {exc}"
    return True, ""


@functools.cache
def filter_class() -> type:
    """GuideFilter mixed into exllamav2's ExLlamaV2Filter (built once, on first use: exllamav2
    is imported only when chosen)."""
    from exllamav2.generator.filters import ExLlamaV2Filter

    class Filter(GuideFilter, ExLlamaV2Filter):  # type: ignore[misc]
        def __init__(self, guide: guides.Guide, width: int, model: Any, tok: Any) -> None:
            ExLlamaV2Filter.__init__(self, model, tok)
            GuideFilter.__init__(self, guide, width)

    return Filter


class ExLlamaV2Engine:
    def __init__(
        self, model_dir: Path, model_id: str, *, max_batch: int = 16, max_context: int | None = None
    ) -> None:
        self.model_dir = model_dir
        self.model_id = model_id
        self._want_batch = max_batch
        self._want_context = max_context
        self.limits = EngineLimits(max_batch=max_batch, max_context=max_context or 2048)
        self.vocab_size = 0  # known once loaded
        self._logits_width = 0  # vocab_size padded as exllamav2's output layer pads it
        self.paged = False
        self._template: ChatTemplate | None = None
        self.tokenizer: Any = None
        self.generator: Any = None
        self.loop: GeneratorLoop | None = None
        self._pieces: list[str] | None = None  # each token id's text, read once when needed
        self._grammars: guides.Grammars | None = None  # built on the loop's thread when needed
        self._model: Any = None

    async def load(self) -> None:
        await asyncio.to_thread(self._load)
        self.loop = GeneratorLoop(
            self.generator,
            self._new_job,
            name=f"exl2-{self.model_id}",
            describe=self._describe,
            vocab_size=self.vocab_size,
        )
        self.loop.start()

    def _load(self) -> None:
        if not is_model_dir(self.model_dir):
            raise ConfigError(
                f"config error in field 'model_dir': {self.model_dir} is not a model "
                "directory (needs config.json and *.safetensors)"
            )
        ok, why = cuda_ready()
        if not ok:
            raise ConfigError(f"config error in field 'engine': exllamav2 needs CUDA: {why}")
        import torch
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
        from exllamav2.attn import has_flash_attn_with_paged
        from exllamav2.generator import ExLlamaV2DynamicGenerator

        free, _ = torch.cuda.mem_get_info()
        require_room(
            int(checkpoint_bytes(self.model_dir) * 1.2), free, "GPU memory", self.model_dir
        )
        config = ExLlamaV2Config(str(self.model_dir))
        context = min(self._want_context or config.max_seq_len, config.max_seq_len)
        config.max_seq_len = context
        # EXLLAMA_NO_FLASH_ATTN turns flash-attn off in the config; paged mode would then refuse
        self.paged = bool(has_flash_attn_with_paged) and not config.no_flash_attn
        batch = self._want_batch if self.paged else 1
        model = ExLlamaV2(config)
        # Paged: one shared pool of pages for all sequences. Unpaged: one sequence's worth.
        cache_len = round_up(context * batch if self.paged else context, PAGE)
        cache = ExLlamaV2Cache(model, max_seq_len=cache_len, lazy=True)
        model.load_autosplit(cache, progress=False)
        self._model = model
        self.tokenizer = ExLlamaV2Tokenizer(config)
        self.vocab_size = int(config.vocab_size)
        # token_bias is added to the logits element by element: it must be their exact width,
        # which includes the padding the head adds (to a multiple of 32 in 0.2/0.3).
        head = model.modules[-1]
        self._logits_width = int(getattr(head, "out_features", round_up(self.vocab_size, 32)))
        self.generator = ExLlamaV2DynamicGenerator(
            model=model,
            cache=cache,
            tokenizer=self.tokenizer,
            max_batch_size=batch,
            max_seq_len=context,
            paged=self.paged,
        )
        self._template = ChatTemplate.from_model_dir(self.model_dir)
        # llguidance reads the tokenizer from tokenizer.json; without it nothing is constrained
        # and such requests are refused up front (core.sampling), not failed at job creation
        constrains = self._tokenizer_json.is_file()
        self.limits = EngineLimits(
            max_batch=batch, max_context=context, constrains_output=constrains
        )
        if not constrains:
            log.warning(
                "%s has no tokenizer.json: structured output (response_format, guided_*, "
                "structured_outputs, a forced tool_choice) is refused for this model",
                self.model_dir,
            )
        log.info(
            "exllamav2 loaded",
            extra={
                "model": self.model_id,
                "paged": self.paged,
                "max_batch": batch,
                "context": context,
            },
        )
        if not self.paged and self._want_batch > 1:
            # Said loudly: the worker works, but far below the batch size the operator asked for.
            log.warning(
                "flash-attn >= 2.5.7 is not available (not installed, or EXLLAMA_NO_FLASH_ATTN "
                "is set): exllamav2 runs unpaged, one request at a time (max_batch 1, not %d); "
                "install flash-attn for continuous batching",
                self._want_batch,
            )

    def _describe(self, token: int) -> tuple[str, bytes]:
        """A token's text as exllamav2 decodes it alone (the generator's own piece list), and
        that text's bytes: a token that is part of a UTF-8 character reads as U+FFFD."""
        if self._pieces is None:
            self._pieces = list(self.tokenizer.get_id_to_piece_list(True))
        text = str(self._pieces[token]) if token < len(self._pieces) else ""
        return text, text.encode("utf-8", "surrogatepass")

    def _encode(self, text: str) -> Any:
        return self.tokenizer.encode(text, add_bos=False, encode_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return int(self._encode(text).shape[-1])

    def chat_prompt(
        self, messages: Sequence[ChatMessage], options: ChatOptions = DEFAULT_OPTIONS
    ) -> str:
        assert self._template is not None
        return self._template.render(messages, options=options)

    def start(self, prompt: str, params: SamplingParams) -> Job:
        ids = self._encode(prompt)
        job = Job(prompt_tokens=int(ids.shape[-1]))
        assert self.loop is not None, "start() before load()"
        self.loop.submit(job, ids, params)
        return job

    def _new_job(self, ids: Any, params: SamplingParams, key: int) -> Any:
        import torch
        from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

        settings = ExLlamaV2Sampler.Settings(**sampler_settings(params))
        if needs_bias(params):  # a job's own tensor: the loop edits it for completion penalties
            settings.token_bias = torch.zeros((self._logits_width,), dtype=torch.float)
            for token, bias in params.logit_bias:
                settings.token_bias[token] = bias
        filters = [] if params.constraint is None else [self._filter(params.constraint)]
        return ExLlamaV2DynamicJob(
            input_ids=ids,
            max_new_tokens=params.max_tokens,
            min_new_tokens=params.min_tokens,
            gen_settings=settings,
            seed=params.seed,
            stop_conditions=stop_conditions(params, int(self.tokenizer.eos_token_id)),
            identifier=key,
            filters=filters,
            decode_special_tokens=not params.skip_special_tokens,
            **job_options(params),
        )

    @property
    def _tokenizer_json(self) -> Path:
        return self.model_dir / "tokenizer.json"

    def _filter(self, constraint: guides.Constraint) -> Any:
        """A fresh grammar filter for one job (on the loop's thread: compiling never blocks the
        event loop). GrammarError fails the job alone (the loop's enqueue catches it)."""
        if self._grammars is None:
            if not self.limits.constrains_output:  # core.sampling refuses these before
                raise guides.GrammarError(f"structured output needs {self._tokenizer_json}")
            eos = int(self.tokenizer.eos_token_id)
            text = self._tokenizer_json.read_text()
            self._grammars = guides.Grammars(guides.json_tokenizer(text, self.vocab_size, eos))
        guide = self._grammars.guide(constraint)
        return filter_class()(guide, self._logits_width, self._model, self.tokenizer)

    # The loop's counters, under the names the other engines use.
    @property
    def running(self) -> int:
        return self.loop.running if self.loop else 0

    @property
    def peak_running(self) -> int:
        return self.loop.peak_running if self.loop else 0

    @property
    def iterations(self) -> int:
        return self.loop.iterations if self.loop else 0

    async def close(self) -> None:
        if self.loop is not None:
            await asyncio.to_thread(self.loop.stop)
