"""The exllamav2 generator thread: hands jobs to the dynamic generator and streams its results.

Kept apart from engine_exl2 (which loads the model) and free of exllamav2 imports, so the loop
that makes continuous batching reach the client (new jobs join between generator steps, each
result goes to its own job, cancelled jobs leave at once) runs in CPU tests too. Every
generator call (enqueue, iterate, cancel) happens on this thread, never on the event loop.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from services.worker.engine import CANCELLED, Chunk, EngineError, Job, SamplingParams

log = logging.getLogger(__name__)

# (input ids, sampling params, identifier) -> an ExLlamaV2DynamicJob
JobFactory = Callable[[Any, SamplingParams, int], Any]


def sampler_settings(params: SamplingParams) -> dict[str, float | int]:
    """exllamav2 Sampler.Settings arguments for a request: what it asked for and nothing else.

    exllamav2's own defaults (temperature 0.8, top_k 50, top_p 0.8, repetition penalty 1.025)
    are a chat UI's taste, not the OpenAI API's, and would make the GPU engine answer differently
    from the CPU one; so every one of them is set. top_k 0 and top_p 1.0 switch those filters
    off in exllamav2's sampler; temperature 0 is greedy (its Settings.greedy()).
    """
    if params.temperature == 0:
        return {"temperature": 1.0, "top_k": 1, "top_p": 0.0, "token_repetition_penalty": 1.0}
    return {
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "token_repetition_penalty": 1.0,
    }


def chunk_for(result: Mapping[str, Any], counted: int) -> tuple[Chunk | None, int]:
    """One generator result for a job as (the chunk to push or None, tokens counted so far).

    Token counts come from the result's token_ids; the final result's new_tokens is the job's
    true total, so the last chunk carries whatever the streamed ones did not (usage adds up).
    """
    if result.get("stage") != "streaming":
        return None, counted
    ids = result.get("token_ids")
    n = 0 if ids is None else int(ids.shape[-1])
    text = str(result.get("text", ""))
    if result.get("eos"):
        total = int(result.get("new_tokens", counted + n))
        reason = "length" if result.get("eos_reason") == "max_new_tokens" else "stop"
        return Chunk(text=text, tokens=max(total - counted, 0), finish_reason=reason), total
    if text or n:
        return Chunk(text=text, tokens=n), counted + n
    return None, counted


class _Live:
    """A job the generator is running: ours, exllamav2's, and the tokens streamed so far."""

    __slots__ = ("counted", "exjob", "job")

    def __init__(self, job: Job, exjob: Any) -> None:
        self.job = job
        self.exjob = exjob
        self.counted = 0


class GeneratorLoop:
    """Owns the generator from its own thread; submit() and stop() are safe from any thread."""

    def __init__(self, generator: Any, make_job: JobFactory, name: str) -> None:
        self.generator = generator
        self._make_job = make_job
        self._incoming: queue.Queue[tuple[Job, Any, SamplingParams] | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._live: dict[int, _Live] = {}
        self.running = 0  # generator jobs being run (admission and tests read it)
        self.peak_running = 0
        self.iterations = 0  # generator steps (tests watch it stop after a cancel)
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job, ids: Any, params: SamplingParams) -> None:
        self._incoming.put((job, ids, params))

    def stop(self, timeout_s: float = 10) -> None:
        """Cancel what is in flight (each job gets a 'cancelled' chunk) and end the thread."""
        self._incoming.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _serve(self) -> None:
        while self._take_incoming():
            self._drop_cancelled()
            # Refreshed here too: after the last job is cancelled there is no iterate() to do it.
            self.running = len(self.generator.active_jobs)
            if self._live:
                self._step()

    def _take_incoming(self) -> bool:
        """Enqueue every job waiting (blocking briefly only when idle); False once stopped."""
        block = not self._live
        try:
            while True:
                item = self._incoming.get(block=block, timeout=0.05 if block else None)
                if item is None:
                    self._fail_all(CANCELLED)
                    return False
                self._enqueue(*item)
                block = False
        except queue.Empty:
            return True

    def _enqueue(self, job: Job, ids: Any, params: SamplingParams) -> None:
        key = next(self._ids)
        try:
            exjob = self._make_job(ids, params, key)
            self.generator.enqueue(exjob)
        except Exception as exc:  # a job exllamav2 refuses fails alone
            log.exception("exllamav2 refused a job")
            job.push(EngineError.of(exc))
            return
        self._live[key] = _Live(job, exjob)

    def _drop_cancelled(self) -> None:
        for key, live in list(self._live.items()):
            if live.job.cancelled:
                self.generator.cancel(live.exjob)
                live.job.push(CANCELLED)
                del self._live[key]

    def _step(self) -> None:
        try:
            results = self.generator.iterate()
            self.iterations += 1
        except Exception as exc:  # fail the jobs in flight, keep the engine alive
            log.exception("exllamav2 iterate failed")
            self._fail_all(EngineError.of(exc))
            return
        self.running = len(self.generator.active_jobs)
        self.peak_running = max(self.peak_running, self.running)
        for result in results:
            self._deliver(result)

    def _deliver(self, result: Mapping[str, Any]) -> None:
        live = self._live.get(result.get("identifier"))  # type: ignore[arg-type]
        if live is None:
            return
        chunk, live.counted = chunk_for(result, live.counted)
        if chunk is None:
            return
        live.job.push(chunk)
        if chunk.finish_reason is not None:
            del self._live[result["identifier"]]

    def _fail_all(self, outcome: Chunk | EngineError) -> None:
        for live in self._live.values():
            try:
                self.generator.cancel(live.exjob)
            except Exception:  # after a failed step the generator may refuse; the job still ends
                log.exception("exllamav2 cancel failed")
            live.job.push(outcome)
        self._live.clear()
