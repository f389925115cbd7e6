"""Log lines that come by the hundred when a service is full (refusals): a few, then a count."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable

# Per window: lines written as they come before the rest are only counted. A refused request
# costs more to log (a record, a JSON line, a write; under `switchboard up` also the
# supervisor's copy) than to refuse, and a burst of them is when the service can least afford it.
LINES_PER_WINDOW = 20
WINDOW_S = 1.0


class SampledLog:
    """The first `lines` INFO lines of each window as they are; one line then counts the rest."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        lines: int = LINES_PER_WINDOW,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger, self.lines, self.window_s, self.clock = logger, lines, window_s, clock
        self._window_end = float("-inf")
        self._written = 0
        self._left_out = 0
        self._timer: asyncio.TimerHandle | None = None

    def info(self, msg: str, extra: dict[str, object]) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        now = self.clock()
        if now >= self._window_end:
            self._window_end, self._written = now + self.window_s, 0
        if self._written < self.lines:
            self._written += 1
            self.logger.info(msg, extra=extra)
            return
        self._left_out += 1
        if self._timer is None:
            # A fresh context: the count belongs to no single request (no request id on it).
            self._timer = asyncio.get_running_loop().call_later(
                self._window_end - now, self._report, msg, context=contextvars.Context()
            )

    def _report(self, msg: str) -> None:
        self._timer = None
        left_out, self._left_out = self._left_out, 0
        self.logger.info(
            "log lines left out",
            extra={"line": msg, "left_out": left_out, "window_s": self.window_s},
        )
