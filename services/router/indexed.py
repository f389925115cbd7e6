"""Replica choice over a model's index (index.py), equal to the scan (scan.py). Pure, no I/O.

Why it is exact: within one (tier, profile) group the cost estimate, room and the deadline test
are monotone in busy, so a group's only candidate that can be the least estimate or the least
busy is its first level not left out (`Group.first`); the replicas holding the prompt's first
block (found through kv.PrefixCaches' reverse index) are evaluated one by one, left out of their
groups. The tie rule (least busy among those within the tolerance, then the injected draw over
their ids, sorted) then needs only those levels' id lists (index.pick).

Cost: O(profiles x log + prefix holders + tried replicas), whatever the number of replicas, when
a tier has at most MAX_PROFILES profiles. Otherwise (every replica reporting its own measured
rates), and when unmeasured replicas' rates would be their peers' mean (policy.with_peers: a mix
of measured and unmeasured replicas, for a few seconds after one starts), this answers FALLBACK
and the caller chooses over the model's columns (vector.py: O(replicas) in numpy, exact too).
"""

from __future__ import annotations

from typing import NamedTuple

from services.router.index import ModelIndex, Profile, contains, nth, pick, size
from services.router.policy import (
    Candidate,
    Defaults,
    Draw,
    PolicyName,
    Prompt,
    estimate_s,
    known_estimate_s,
)

MAX_PROFILES = 16


class Ask(NamedTuple):
    """One attempt's question (FleetView.choose's arguments) and its prompt's holders."""

    exclude: frozenset[str]
    need_room: bool
    slots: int
    prompt: Prompt
    budget_s: float | None
    hits: dict[str, int]  # indexed replicas holding the prompt's first block -> cached blocks


class Option(NamedTuple):
    """A candidate: a group's first level (its ids, less the left-out ones) or one holder."""

    busy: int
    estimate_s: float
    known_s: float
    ids: list[str] | None
    worker_id: str = ""


class Pool(NamedTuple):
    options: list[Option]
    unheard: bool  # some usable replica was never heard from: spread, do not compare costs
    skip: set[str]


FALLBACK = "scan"


def candidate(profile: Profile, busy: int, cached: int = 0, worker_id: str = "") -> Candidate:
    return Candidate(
        worker_id=worker_id,
        busy=busy,
        max_in_flight=profile.max_in_flight,
        service_s=profile.service_s,
        prefill_tokens_per_s=profile.prefill_tokens_per_s,
        cached_blocks=cached,
        known=profile.known,
    )


def peers_matter(profiles: list[Profile], tier: int) -> bool:
    """Would some candidate's unmeasured rate be its peers' mean (not the fleet default)?"""
    # A replica never heard from in tier 0 makes the choice spread, and its own estimate is 0;
    # one running without heartbeats (tier 1) is costed like any other.
    heard = [p for p in profiles if p.heard or tier == 1]
    service = {bool(p.service_s) for p in heard}
    return len(service) > 1 or len({bool(p.prefill_tokens_per_s) for p in heard}) > 1


def pool(
    ix: ModelIndex, ask: Ask, defaults: Defaults, max_profiles: int = MAX_PROFILES
) -> Pool | str | None:
    """The first tier with a usable replica, its candidates (after the deadline), or None when
    no replica is usable, or FALLBACK."""
    skip = set(ask.exclude) | set(ask.hits)
    for tier, groups in enumerate(ix.tiers):
        if not groups:  # (a prefix holder is in a group of its tier too)
            continue
        if len(groups) > max_profiles or peers_matter(list(groups), tier):
            return FALLBACK
        options: list[Option] = []
        usable = unheard = False
        for profile, group in groups.items():
            busy = group.first(skip)
            if busy is None or (ask.need_room and not profile.room(busy, ask.slots)):
                continue
            usable, unheard = True, unheard or (tier == 0 and not profile.heard)
            option = _option(candidate(profile, busy), ask, defaults, group.ids[busy])
            if option is not None:
                options.append(option)
        for worker_id, cached in ask.hits.items():
            slot = ix.slots[worker_id]
            if slot.tier != tier or worker_id in ask.exclude:
                continue
            if ask.need_room and not slot.profile.room(slot.busy, ask.slots):
                continue
            usable, unheard = True, unheard or (tier == 0 and not slot.profile.heard)
            c = candidate(slot.profile, slot.busy, cached, worker_id)
            option = _option(c, ask, defaults, None)
            if option is not None:
                options.append(option)
        if usable:
            return Pool(options, unheard, skip)
    return None


def _option(c: Candidate, ask: Ask, defaults: Defaults, ids: list[str] | None) -> Option | None:
    known = known_estimate_s(c, ask.prompt, defaults)
    if ask.budget_s is not None and known > ask.budget_s:
        return None
    return Option(c.busy, estimate_s(c, ask.prompt, defaults), known, ids, c.worker_id)


def chosen(
    found: Pool, policy: PolicyName, defaults: Defaults, draw: Draw
) -> tuple[str, int, float | None]:
    """(worker, its busy, its estimate under cost) among a pool's candidates (at least one)."""
    options, skip = found.options, found.skip
    if policy == "least_busy":
        fewest = min(o.busy for o in options)
        least = [
            o.worker_id if o.ids is None else nth(o.ids, skip, 0)
            for o in options
            if o.busy == fewest
        ]
        return min(least), fewest, None
    estimate: float | None = None
    if not found.unheard:
        best = min(o.estimate_s for o in options)
        bound = max(best * (1 + defaults.tie_ratio), best + defaults.tie_s)
        options = [o for o in options if o.estimate_s <= bound]
    fewest = min(o.busy for o in options)
    tied = [o for o in options if o.busy == fewest]
    groups = [o.ids for o in tied if o.ids is not None]
    singles = [o.worker_id for o in tied if o.ids is None]
    count = size(groups, skip, singles)
    worker_id = pick(groups, skip, singles, min(int(draw() * count), count - 1))
    if not found.unheard:
        estimate = next(o.estimate_s for o in tied if _has(o, worker_id, skip))
    return worker_id, fewest, estimate


def _has(option: Option, worker_id: str, skip: set[str]) -> bool:
    if option.ids is None:
        return option.worker_id == worker_id
    return worker_id not in skip and contains(option.ids, worker_id)
