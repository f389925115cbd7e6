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

import msgspec

from services.worker.engines.base import CANCELLED, Chunk, EngineError, Job, SamplingParams
from services.worker.engines.exl2_jobs import CompletionPenalty, chunk_for, filter_error
from services.worker.engines.exl2_logprobs import result_logprobs, unnamed
from services.worker.engines.logprobs import Describe

log = logging.getLogger(__name__)

# (input ids, sampling params, identifier) -> an ExLlamaV2DynamicJob
JobFactory = Callable[[Any, SamplingParams, int], Any]


class _Live:
    """A job the generator is running: ours, exllamav2's, and the tokens streamed so far."""

    __slots__ = ("counted", "exjob", "include_stop", "job", "logprobs", "penalty")

    def __init__(
        self, job: Job, exjob: Any, penalty: CompletionPenalty | None, params: SamplingParams
    ) -> None:
        self.job = job
        self.exjob = exjob
        self.counted = 0
        self.penalty = penalty
        self.logprobs = params.logprobs
        self.include_stop = params.include_stop_str_in_output

    def penalize(self) -> None:
        """Fold the tokens sampled since the last step into the job's token_bias. Reads the
        job's sequence, not the results: exllamav2 holds back the tokens of a possible stop
        string, and the penalty must see them at once."""
        if self.penalty is None:
            return
        sequence = self.exjob.sequences[0].sequence_ids.torch()
        changes = self.penalty.take(sequence[0, self.penalty.done :].tolist())
        bias = self.exjob.gen_settings.token_bias
        for t, amount in changes.items():
            if t < bias.shape[-1]:
                bias[t] += amount


class GeneratorLoop:
    """Owns the generator from its own thread; submit() and stop() are safe from any thread."""

    def __init__(
        self,
        generator: Any,
        make_job: JobFactory,
        name: str,
        *,
        describe: Describe | None = None,
        vocab_size: int = 0,
    ) -> None:
        """describe: the text and bytes of a token id (for logprobs); vocab_size: the model's
        real vocabulary (the logits' width less the head's padding)."""
        self.generator = generator
        self._make_job = make_job
        self._describe = describe or unnamed
        self._vocab_size = vocab_size
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
        penalty = None
        if params.frequency_penalty or params.presence_penalty:
            penalty = CompletionPenalty(params, int(ids.shape[-1]))
        self._live[key] = _Live(job, exjob, penalty, params)

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
        self._penalize()
        for result in results:
            self._deliver(result)
        self._fail_refused()

    def _fail_refused(self) -> None:
        """A job whose grammar refused its token fails alone (it never should: the mask)."""
        for key, live in list(self._live.items()):
            why = filter_error(live.exjob)
            if why:
                self.generator.cancel(live.exjob)
                live.job.push(EngineError(why))
                del self._live[key]

    def _penalize(self) -> None:
        """Update every job's completion penalties before the next iterate() samples again."""
        for key, live in list(self._live.items()):
            try:
                live.penalize()
            except Exception as exc:  # that job cannot be penalized as asked: it fails alone
                log.exception("exllamav2 penalty update failed")
                self.generator.cancel(live.exjob)
                live.job.push(EngineError.of(exc))
                del self._live[key]

    def _deliver(self, result: Mapping[str, Any]) -> None:
        live = self._live.get(result.get("identifier"))  # type: ignore[arg-type]
        if live is None:
            return
        chunk, live.counted = chunk_for(result, live.counted, live.include_stop)
        if chunk is None:
            return
        if live.logprobs is not None:
            try:
                steps = result_logprobs(result, live.logprobs, self._vocab_size, self._describe)
            except Exception as exc:  # e.g. a release that renamed a result key: this job fails
                log.exception("exllamav2 logprobs unreadable")
                if chunk.finish_reason is None:
                    self.generator.cancel(live.exjob)
                live.job.push(EngineError.of(exc))
                del self._live[result["identifier"]]
                return
            chunk = msgspec.structs.replace(chunk, logprobs=steps)
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
