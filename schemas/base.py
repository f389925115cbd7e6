"""Wire base classes, the sequenced Envelope and constrained id aliases. No I/O.

Schema evolution (msgspec's rules, and ours): a new field always has a default, an existing field
never changes type, tags never change, and no wire Struct forbids unknown fields, so an older
decoder reads a newer message by skipping what it does not know.
"""

from __future__ import annotations

from typing import Annotated, Generic, TypeVar

import msgspec

# Ids travel inside subjects, so they follow the NATS token rules (see schemas.subjects.token).
WorkerId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_\-]+$")]
# Model ids follow Hugging Face naming ("org/name:tag") and never go into subjects.
ModelId = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^\s]+$")]
Count = Annotated[int, msgspec.Meta(ge=0)]
Seq = Annotated[int, msgspec.Meta(ge=0)]


class WireStruct(msgspec.Struct, frozen=True):
    """Base of every wire type: immutable. Concrete classes also say kw_only=True."""


class Event(WireStruct, frozen=True, tag_field="type", tag=True):
    """Base of tagged event bodies; each subclass sets an explicit, dotted, stable tag."""


E = TypeVar("E")


class Envelope(WireStruct, Generic[E], frozen=True, kw_only=True):
    """One message of a stream.

    seq starts at 1 and increases by exactly 1 per message of (source, epoch); a registry beacon
    repeats the last seq (0 before the first event) instead of advancing it. epoch changes when the
    source loses its sequence. sent_at is unix seconds, for staleness only, never for ordering.
    """

    source: str
    epoch: Annotated[int, msgspec.Meta(ge=0)]
    seq: Seq
    sent_at: float
    body: E
