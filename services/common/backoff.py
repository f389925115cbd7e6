"""Retry pacing for every wait-and-try-again loop: delays that double from `first_s` to `max_s`."""

from __future__ import annotations

import asyncio


class Backoff:
    """`await pace.wait()` between attempts; `pace.delay` is the wait it will take next.

    Written here rather than taken from a retry library: the loops that use it differ in what
    they catch, log and give up on, and a decorator-style library would hide exactly that."""

    def __init__(self, first_s: float = 0.1, max_s: float = 5.0) -> None:
        if first_s <= 0 or max_s < first_s:
            raise ValueError(f"backoff needs 0 < first_s <= max_s, got {first_s}, {max_s}")
        self.first_s, self.max_s = first_s, max_s
        self.delay = first_s

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.max_s)

    def reset(self) -> None:
        """After a success: the next failure starts again from first_s."""
        self.delay = self.first_s
