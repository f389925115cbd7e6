"""exllamav2 engine on CUDA: the dynamic generator (continuous batching) on its own thread.

The only module that imports exllamav2 or touches CUDA, and only when chosen. All generator calls
(enqueue, iterate, cancel) happen on the generator thread; the event loop only hands jobs over a
thread-safe queue and receives chunks through Job.push. Paged mode (true continuous batching)
needs flash-attn >= 2.5.7; without it exllamav2's unpaged fallback runs one job at a time, and
max_batch (what admission and capacity use) says so.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from schemas.inference import ChatMessage
from services.common.errors import ConfigError
from services.worker.demo_model import is_model_dir
from services.worker.engine import Chunk, EngineError, EngineLimits, Job, SamplingParams
from services.worker.memory import checkpoint_bytes, require_room
from services.worker.template import ChatTemplate

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


class ExLlamaV2Engine:
    def __init__(
        self, model_dir: Path, model_id: str, *, max_batch: int = 16, max_context: int | None = None
    ) -> None:
        self.model_dir = model_dir
        self.model_id = model_id
        self._want_batch = max_batch
        self._want_context = max_context
        self.limits = EngineLimits(max_batch=max_batch, max_context=max_context or 2048)
        self.paged = False
        self.running = 0
        self.peak_running = 0
        self.iterations = 0  # generator steps (tests watch it stop after a cancel)
        self._incoming: queue.Queue[tuple[Job, list[int], SamplingParams] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._template: ChatTemplate | None = None
        self._ids = itertools.count(1)
        self.tokenizer: Any = None
        self.generator: Any = None

    async def load(self) -> None:
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(
            target=self._serve, name=f"exl2-{self.model_id}", daemon=True
        )
        self._thread.start()

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
        self.paged = bool(has_flash_attn_with_paged)
        batch = self._want_batch if self.paged else 1
        model = ExLlamaV2(config)
        # Paged: one shared pool of pages for all sequences. Unpaged: one sequence's worth.
        cache_len = round_up(context * batch if self.paged else context, PAGE)
        cache = ExLlamaV2Cache(model, max_seq_len=cache_len, lazy=True)
        model.load_autosplit(cache, progress=False)
        self.tokenizer = ExLlamaV2Tokenizer(config)
        self.generator = ExLlamaV2DynamicGenerator(
            model=model,
            cache=cache,
            tokenizer=self.tokenizer,
            max_batch_size=batch,
            max_seq_len=context,
            paged=self.paged,
        )
        self._template = ChatTemplate.from_model_dir(self.model_dir)
        self.limits = EngineLimits(max_batch=batch, max_context=context)
        log.info(
            "exllamav2 loaded",
            extra={
                "model": self.model_id,
                "paged": self.paged,
                "max_batch": batch,
                "context": context,
            },
        )

    def _encode(self, text: str) -> Any:
        return self.tokenizer.encode(text, add_bos=False, encode_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return int(self._encode(text).shape[-1])

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        assert self._template is not None
        return self._template.render(messages)

    def start(self, prompt: str, params: SamplingParams) -> Job:
        ids = self._encode(prompt)
        job = Job(prompt_tokens=int(ids.shape[-1]))
        self._incoming.put((job, ids, params))
        return job

    # ---- the generator thread ----

    def _serve(self) -> None:
        live: dict[int, tuple[Job, Any, list[int]]] = {}  # key -> (job, exl2 job, [tokens counted])
        while True:
            block = not live
            try:
                while True:
                    item = self._incoming.get(block=block, timeout=0.05 if block else None)
                    if item is None:
                        for job, exjob, _ in live.values():
                            self.generator.cancel(exjob)
                            job.push(Chunk(text="", tokens=0, finish_reason="cancelled"))
                        return
                    self._enqueue(live, *item)
                    block = False
            except queue.Empty:
                pass
            for key, (job, exjob, _) in list(live.items()):
                if job.cancelled:
                    self.generator.cancel(exjob)
                    job.push(Chunk(text="", tokens=0, finish_reason="cancelled"))
                    del live[key]
            # Refreshed here too: after the last job is cancelled there is no iterate() to do it.
            self.running = len(self.generator.active_jobs)
            if not live:
                continue
            try:
                results = self.generator.iterate()
                self.iterations += 1
            except Exception as exc:  # fail the jobs in flight, keep the engine alive
                log.exception("exllamav2 iterate failed")
                for job, exjob, _ in live.values():
                    self.generator.cancel(exjob)
                    job.push(EngineError(f"{type(exc).__name__}: {exc}"))
                live.clear()
                continue
            self.running = len(self.generator.active_jobs)
            self.peak_running = max(self.peak_running, self.running)
            for r in results:
                self._deliver(live, r)
            self.running = len(self.generator.active_jobs)

    def _enqueue(
        self,
        live: dict[int, tuple[Job, Any, list[int]]],
        job: Job,
        ids: Any,
        params: SamplingParams,
    ) -> None:
        from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

        if params.temperature == 0:
            settings = ExLlamaV2Sampler.Settings.greedy()
        else:
            settings = ExLlamaV2Sampler.Settings(
                temperature=params.temperature, top_p=params.top_p, top_k=params.top_k
            )
        key = next(self._ids)
        exjob = ExLlamaV2DynamicJob(
            input_ids=ids,
            max_new_tokens=params.max_tokens,
            gen_settings=settings,
            seed=params.seed,
            stop_conditions=[self.tokenizer.eos_token_id, *params.stop],
            identifier=key,
        )
        self.generator.enqueue(exjob)
        live[key] = (job, exjob, [0])

    def _deliver(self, live: dict[int, tuple[Job, Any, list[int]]], r: dict[str, Any]) -> None:
        if r.get("stage") != "streaming":
            return
        entry = live.get(r.get("identifier"))  # type: ignore[arg-type]
        if entry is None:
            return
        job, _, counted = entry
        ids = r.get("token_ids")
        n = 0 if ids is None else int(ids.shape[-1])
        text = r.get("text", "")
        if r.get("eos"):
            total = int(r.get("new_tokens", counted[0] + n))
            reason = "length" if r.get("eos_reason") == "max_new_tokens" else "stop"
            job.push(Chunk(text=text, tokens=max(total - counted[0], 0), finish_reason=reason))
            del live[r["identifier"]]
        elif text or n:
            counted[0] += n
            job.push(Chunk(text=text, tokens=n))

    async def close(self) -> None:
        self._incoming.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
