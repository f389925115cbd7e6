"""Stop-string scanning over streamed text. Pure.

Text that could be the beginning of a stop string is held back until the next piece shows whether
it is, so a stop string split across two pieces is never half-emitted. The text ends before the
stop string, or (vLLM's include_stop_str_in_output) after it.
"""

from __future__ import annotations


class StopScanner:
    def __init__(self, stops: tuple[str, ...], include: bool = False) -> None:
        """include: the stop string that ends the text stays in it."""
        self.stops = tuple(s for s in stops if s)
        self.include = include
        self.pending = ""  # received but not yet emitted
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add generated text; return what is safe to emit now (nothing after a stop)."""
        if self.stopped:
            return ""
        text = self.pending + piece
        # the earliest stop string; of those starting there, the first the request lists
        hit = min(
            ((i, k) for k, s in enumerate(self.stops) if (i := text.find(s)) >= 0), default=None
        )
        if hit is not None:
            self.stopped = True
            self.pending = ""
            at, k = hit
            return text[: at + len(self.stops[k])] if self.include else text[:at]
        keep = self._partial_suffix(text)
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The generation ended without a stop: release what was held back."""
        out, self.pending = self.pending, ""
        return out

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
