"""The gateway's rules: a request's TTFT target, how long it may wait, the capacity cap. Pure.

- Target (seconds to the first token): the model's (`model_ttft_target_s`, else `ttft_target_s`),
  raised to the largest `priority_ttft_target_s` entry at or below the request's priority (so
  priority can buy patience); a client's `x-switchboard-ttft-target-s` replaces it, clamped to
  `max_ttft_target_s` (asking for less is always allowed).
- Patience, at arrival, from the best replica's estimated TTFT (policy.estimate_s over the
  eligible replicas; a replica whose load is unknown counts as 0): beyond the target, refused at
  once; else it may wait at the gateway for target - estimate, at most max_wait_s.
- Who goes (Placement, asked for a request about to be admitted): a replica that can take it
  now, with room and an estimate within what is left of its target. The forwarder asks it first
  and the arrival estimate only when none can (one question to the fleet view per request in
  the common case).
- Cap: an operator's capacity override (x this router's share) caps the requests in this
  router's hands; a capacity the workers reported (their slots) does not, because those requests
  include the ones queued inside workers, and the fleet view knows each replica's slots and load.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import msgspec

from schemas.capacity import MAX_CAPACITY, CapacitySource, CapacityView
from services.admission.core import RETRY_AFTER_MAX_S, RETRY_AFTER_MIN_S
from services.router.core import Choice, FleetView
from services.router.policy import Prompt


class Targets(msgspec.Struct, frozen=True, kw_only=True):
    """Seconds to the first token a request is meant to meet (see the module docstring)."""

    default_s: float = 10.0
    per_model: dict[str, float] = msgspec.field(default_factory=dict)
    per_priority: dict[int, float] = msgspec.field(default_factory=dict)
    max_s: float = 60.0

    def target_s(self, model: str, priority: int, asked_s: float | None = None) -> float:
        if asked_s is not None:
            return min(asked_s, self.max_s)
        target = self.per_model.get(model, self.default_s)
        bought = [p for p in self.per_priority if p <= priority]
        return max(target, self.per_priority[max(bought)]) if bought else target


class TooLate(msgspec.Struct, frozen=True):
    """The best replica's estimate alone misses the target: refuse now."""

    retry_after_s: int


class Patience(msgspec.Struct, frozen=True):
    """It may wait at the gateway this long for a replica that can take it."""

    wait_s: float


def patience(target_s: float, best_s: float, max_wait_s: float) -> TooLate | Patience:
    """Refuse at once, or wait at most min(target - best estimate, max_wait_s)."""
    if best_s > target_s:
        # Once the backlog ahead has drained by the excess, the estimate meets the target again.
        late = math.ceil(best_s - target_s)
        return TooLate(min(max(late, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S))
    return Patience(min(target_s - best_s, max_wait_s))


def capacity_cap(capacity: CapacityView | None, model: str, share: float) -> int:
    """The most requests this router holds at once for the model (in flight, not queued here)."""
    if capacity is None:
        return MAX_CAPACITY  # unknown: the fleet view and workers' own admission still protect
    entry = capacity.models.get(model, capacity.fleet)
    if entry.source is not CapacitySource.OVERRIDE:
        return MAX_CAPACITY
    return capacity_share(capacity, model, share)


def capacity_share(capacity: CapacityView, model: str, share: float) -> int:
    """This router's share of the model's capacity (what the fleet page shows as its limit)."""
    entry = capacity.models.get(model, capacity.fleet)
    return max(int(entry.capacity * share), 1)


class Placement:
    """A request's first replica, chosen as the gateway admits it: one that can take it now (a
    free slot, or queue room) with an estimated TTFT within what is left of its target. Counted
    as dispatched at once, so the next request in line sees it taken. The forwarder asks find()
    and take() itself when the gate is open; a queued request's gate asks fits()."""

    __slots__ = ("choice", "clock", "deadline", "model", "prompt", "slots", "view")

    def __init__(
        self,
        view: FleetView,
        clock: Callable[[], float],
        model: str,
        prompt: Prompt,
        *,
        deadline: float,
        slots: int = 1,
    ) -> None:
        self.view, self.clock, self.model, self.prompt = view, clock, model, prompt
        self.deadline, self.slots = deadline, slots
        self.choice: Choice | None = None

    def find(self) -> Choice | None:
        """A replica that can take it now, in time (nothing counted yet), or None."""
        now = self.clock()
        choice = self.view.choose(
            self.model,
            now,
            need_room=True,
            prompt=self.prompt,
            budget_s=self.deadline - now,
            slots=self.slots,
        )
        return choice if isinstance(choice, Choice) else None

    def in_time(self, choice: Choice) -> bool:
        """Is what find() answered within the arrival estimate's judgement (so the request needs
        no estimate)? Yes when it is in the tier that estimate looks at, the first with a usable
        replica: a fresh replica, or any where none is fresh or unheard (heartbeats off); the
        least estimate there, room or not, is at most this one's. A replica with an old
        heartbeat, while fresh ones are full, is taken only if their estimate allows it."""
        return choice.fresh or not self.view.any_first_tier(self.model)

    def take(self, choice: Choice) -> None:
        """The request goes to `choice` (what find() answered, nothing changed since)."""
        # If the client leaves in this very instant the count stays until the next heartbeat.
        self.view.dispatched_to(choice.worker_id, self.slots)
        self.choice = choice

    def fits(self) -> bool:
        """find() and take() in one (Gate.slot's `fits`)."""
        choice = self.find()
        if choice is None:
            return False
        self.take(choice)
        return True
