"""A request's one record as the router finishes it: its metrics and its `request` log line."""

from __future__ import annotations

import logging
import time

from services.common.sampled_log import SampledLog
from services.router.metrics import RouterMetrics


class Tally:
    """What happened to one request so far, for its record."""

    __slots__ = ("attempts", "began", "label", "model", "ttfb_s", "worker")

    def __init__(self, model: str, began: float) -> None:
        self.model = model
        self.label = model  # its metrics label: UNKNOWN when no worker serves the model
        self.began = began  # time.perf_counter() as the edge took the request
        self.worker = ""
        self.attempts = 0
        self.ttfb_s: float | None = None


class Records:
    """Counts every request; logs its `request` line on `log`, one in `every` of the successful
    ones (a sampled line says how many it stands for: `one_in`)."""

    def __init__(self, metrics: RouterMetrics, log: logging.Logger, every: int = 1) -> None:
        self.metrics, self.log, self.every = metrics, log, every
        self.busy_log = SampledLog(log)
        self._ok = 0

    def finish(self, tally: Tally, status: int, origin: str) -> None:
        busy = status in (429, 503)
        outcome = "ok" if status < 400 else ("busy" if busy else f"http_{status}")
        m = self.metrics
        m.requests_of(tally.label, outcome).inc()
        if busy:
            m.backpressure_of(origin).inc()
        duration = time.perf_counter() - tally.began
        m.duration_of(tally.label).observe(duration)
        if tally.ttfb_s is not None:
            m.ttfb_of(tally.label).observe(tally.ttfb_s)
        # The line's fields are built only when it is written.
        if not self.log.isEnabledFor(logging.INFO):
            return
        sampled = status < 400 and self.every > 1
        if sampled:
            self._ok += 1
            if self._ok % self.every:
                return
        extra: dict[str, object] = {
            "model": tally.model,
            "status": status,
            "origin": origin,
            "worker_id": tally.worker,
            "attempts": tally.attempts,
            "duration_ms": round(duration * 1000, 2),
        }
        if sampled:
            extra["one_in"] = self.every
        if busy:  # they come by the hundred when the fleet is full
            self.busy_log.info("request", extra)
        else:
            self.log.info("request", extra=extra)
