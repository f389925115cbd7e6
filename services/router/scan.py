"""Replica choice by a scan of a model's replicas, the documented semantics literally. Pure, no I/O.

core.FleetView answers from its index (indexed.py) or its columns (vector.py), never from this;
tests hold both to it, and eligible/pool answer the view's reads of the same names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from schemas.registry import WorkerRecord, WorkerStatus
from services.router.choices import Choice, NoChoice, NoReplica, UnknownModel
from services.router.policy import (
    Candidate,
    Prompt,
    cheapest,
    least_busy,
    least_estimate_s,
    within,
)

if TYPE_CHECKING:
    from services.router.core import FleetView

NO_PROMPT = Prompt()


def eligible(
    view: FleetView,
    model: str,
    now: float,
    exclude: frozenset[str],
    need_room: bool,
    slots: int = 1,
) -> list[WorkerRecord] | NoChoice:
    """Ready replicas of the model that may take this attempt, or why there are none."""
    serving = list(view.serving.get(model, {}).values())
    if not serving:
        return UnknownModel(model)
    pending = any(r.status == WorkerStatus.PENDING for r in serving)
    ready = [r for r in serving if r.status == WorkerStatus.READY and r.id not in exclude]
    usable = [
        r
        for r in ready
        if view.cooldown_until.get(r.id, 0.0) <= now and r.id not in view.suspect_since
    ]
    if need_room:
        usable = [r for r in usable if view.has_room(r.id, model, slots)]
    if usable:
        return usable
    if not ready:
        return NoReplica(model, pending, "no ready replica")
    return NoReplica(model, pending, "every replica is busy or unreachable")


def pool(
    view: FleetView, usable: list[WorkerRecord], now: float
) -> tuple[list[WorkerRecord], bool]:
    """Whom to choose among, and whether some of them were never heard from (startup)."""
    fresh = [r for r in usable if view.is_fresh(r.id, now)]
    unheard = [r for r in usable if view.unheard(r)]
    # stale load is used only when nothing else is known
    return (fresh + unheard or usable), bool(unheard)


def best_estimate(
    view: FleetView, model: str, now: float, prompt: Prompt = NO_PROMPT
) -> float | None:
    usable = eligible(view, model, now, frozenset(), need_room=False)
    if not isinstance(usable, list):
        return None
    candidates = [view.candidate(r.id, model, prompt) for r in pool(view, usable, now)[0]]
    return least_estimate_s(candidates, prompt, view.defaults)


def choose(
    view: FleetView,
    model: str,
    now: float,
    exclude: frozenset[str] = frozenset(),
    need_room: bool = False,
    prompt: Prompt = NO_PROMPT,
    budget_s: float | None = None,
    slots: int = 1,
) -> Choice | NoChoice:
    usable = eligible(view, model, now, exclude, need_room, slots)
    if not isinstance(usable, list):
        return usable
    found, unheard = pool(view, usable, now)
    candidates: list[Candidate] = [view.candidate(r.id, model, prompt) for r in found]
    if budget_s is not None:
        candidates = within(candidates, prompt, view.defaults, budget_s)
        if not candidates:
            return NoReplica(model, False, "no replica can start it within its deadline")
    estimate: float | None = None
    if view.policy == "least_busy":
        best = least_busy(candidates, None)
    elif unheard:  # startup: an unknown replica has no cost to compare; spread instead
        best = least_busy(candidates, view.draw)
    else:
        best, estimate = cheapest(candidates, prompt, view.defaults, view.draw)
    url = next(r.url for r in found if r.id == best.worker_id)
    return Choice(best.worker_id, url, best.busy, view.is_fresh(best.worker_id, now), estimate)
