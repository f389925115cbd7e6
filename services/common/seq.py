"""Sequence stamping and tracking for envelope streams: pure, no I/O.

Invariants:
- A Sequencer stamps 1, 2, 3, ... for one (source, epoch); a new Sequencer means a new epoch.
- SequenceTracker.observe() changes state only on InOrder: a consumer that sees Gap or NewEpoch
  re-snapshots and then calls reset() with the snapshot's (epoch, seq).
- Delta streams use observe()/observe_beacon(); state streams (heartbeats, views) use is_newer().
"""

from __future__ import annotations

from typing import Generic, TypeVar

from schemas.base import Envelope, WireStruct

E = TypeVar("E")


class Sequencer:
    """Stamps envelopes of one stream with contiguous seq numbers."""

    __slots__ = ("epoch", "seq", "source")

    def __init__(self, source: str, epoch: int, seq: int = 0) -> None:
        self.source = source
        self.epoch = epoch
        self.seq = seq  # the last seq stamped; continues from a persisted value after a restart

    def stamp(self, body: E, now: float) -> Envelope[E]:
        self.seq += 1
        return Envelope(source=self.source, epoch=self.epoch, seq=self.seq, sent_at=now, body=body)

    def beacon(self, body: E, now: float) -> Envelope[E]:
        """An envelope that repeats the last seq instead of advancing it."""
        return Envelope(source=self.source, epoch=self.epoch, seq=self.seq, sent_at=now, body=body)


class InOrder(WireStruct, frozen=True, kw_only=True):
    """The next message: apply it."""

    seq: int


class Duplicate(WireStruct, frozen=True, kw_only=True):
    """Already seen (seq equal to or older than the last applied): ignore it."""

    seq: int
    last: int


class Gap(WireStruct, frozen=True, kw_only=True):
    """At least one message was lost between `expected` and `got`: re-snapshot."""

    expected: int
    got: int


class NewEpoch(WireStruct, frozen=True, kw_only=True):
    """The source restarted without its sequence, or was never seen: re-snapshot."""

    epoch: int
    known_epoch: int | None


Verdict = InOrder | Duplicate | Gap | NewEpoch


class SequenceTracker:
    """Tracks the last applied (epoch, seq) per source of a delta stream."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}

    def position(self, source: str) -> tuple[int, int] | None:
        return self._last.get(source)

    def reset(self, source: str, epoch: int, seq: int) -> None:
        """Adopt a snapshot's position: the next in-order message is seq + 1."""
        self._last[source] = (epoch, seq)

    def forget(self, source: str) -> None:
        self._last.pop(source, None)

    def observe(self, source: str, epoch: int, seq: int) -> Verdict:
        """Classify one delta message; only InOrder advances the position."""
        known = self._last.get(source)
        if known is None:
            # Seeing seq 1 means we saw the stream from its very start; anything else means
            # we joined midway and must snapshot first.
            if seq == 1:
                self._last[source] = (epoch, 1)
                return InOrder(seq=1)
            return NewEpoch(epoch=epoch, known_epoch=None)
        known_epoch, last = known
        if epoch != known_epoch:
            return NewEpoch(epoch=epoch, known_epoch=known_epoch)
        if seq <= last:
            return Duplicate(seq=seq, last=last)
        if seq == last + 1:
            self._last[source] = (epoch, seq)
            return InOrder(seq=seq)
        return Gap(expected=last + 1, got=seq)

    def observe_beacon(self, source: str, epoch: int, last_seq: int) -> Verdict:
        """Check a beacon (which repeats the source's last seq) without advancing anything."""
        known = self._last.get(source)
        if known is None:
            return NewEpoch(epoch=epoch, known_epoch=None)
        known_epoch, last = known
        if epoch != known_epoch:
            return NewEpoch(epoch=epoch, known_epoch=known_epoch)
        if last_seq > last:
            return Gap(expected=last + 1, got=last_seq)
        # A beacon equal to our position is the healthy case; an older one crossed an event.
        return InOrder(seq=last) if last_seq == last else Duplicate(seq=last_seq, last=last)


def is_newer(known: tuple[int, int] | None, epoch: int, seq: int) -> bool:
    """State streams: latest wins. A larger epoch is a later process (epochs are boot times)."""
    if known is None:
        return True
    known_epoch, known_seq = known
    if epoch != known_epoch:
        return epoch > known_epoch
    return seq > known_seq


class Latest(Generic[E]):
    """Latest-wins store for a state stream, keyed by source, with the time each entry arrived."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, int, float, E]] = {}

    def offer(self, source: str, epoch: int, seq: int, value: E, now: float) -> bool:
        """Keep value if it is newer than what we have; return whether it was kept."""
        entry = self._entries.get(source)
        if not is_newer(None if entry is None else (entry[0], entry[1]), epoch, seq):
            return False
        self._entries[source] = (epoch, seq, now, value)
        return True

    def get(self, source: str) -> tuple[float, E] | None:
        entry = self._entries.get(source)
        return None if entry is None else (entry[2], entry[3])

    def drop(self, source: str) -> None:
        self._entries.pop(source, None)

    def sources(self) -> list[str]:
        return list(self._entries)
