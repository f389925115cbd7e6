"""Stop-string scanning over streamed text. Pure.

Text that could be the beginning of a stop string is held back until the next piece shows whether
it is, so a stop string split across two pieces is never half-emitted.
"""

from __future__ import annotations


class StopScanner:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""  # received but not yet emitted
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add generated text; return what is safe to emit now (nothing after a stop)."""
        if self.stopped:
            return ""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.pending = ""
            return text[: min(hits)]
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
