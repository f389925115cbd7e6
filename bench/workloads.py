"""The routing benchmark's fleet and workloads: seeded, deterministic schedules of chat requests.

Every function here is a function of its arguments (a seed, not a global random state), so one
seed gives one schedule on every machine and every target of a run sees the same requests.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# (share, fewest, most): a request draws a band by share, then a length uniformly inside it.
Mix = tuple[tuple[float, int, int], ...]
OUTPUT_MIX: Mix = ((0.5, 8, 32), (0.4, 32, 96), (0.1, 96, 192))
PROMPT_MIX: Mix = ((0.6, 16, 96), (0.3, 128, 512), (0.1, 768, 1536))
QUESTION_WORDS = (8, 64)  # a user turn in the shared-prefix workload
SYSTEM_WORDS = (1024, 2048)  # a group's shared system prompt
CHAT_SYSTEM_WORDS = (32, 128)  # a conversation's own short system prompt
TURNS = (2, 6)  # turns per conversation
THINK_S = 3.0  # mean pause between a conversation's turns (exponential)
_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "one", "two", "three", "four",
    "five", "six", "seven", "eight", "nine", "zero", "fleet", "router", "worker", "queue",
    "token", "cache", "prefix", "batch",
)  # fmt: skip


@dataclass(frozen=True)
class SimWorker:
    """One sim worker of the fleet: the flags that make it, and the work it can do."""

    name: str
    tokens_per_s: float  # per sequence, alone in the batch
    batch: int  # sequences at once (engine batch = worker slots)
    ttft_s: float = 0.02
    slowdown_per_seq: float = 0.05  # the sim's default: each extra sequence slows a step by 5 %
    # Prefill of the prompt tokens its prefix cache does not hold (a GPU prefills far faster
    # than it decodes one sequence), and that cache's size in 256-byte prompt blocks (~2 MB of
    # prompt text): what makes shared-prefix traffic (workload b) worth routing for.
    prefill_tokens_per_s: float = 3000.0
    prefix_cache_blocks: int = 8192

    def flags(self) -> tuple[str, ...]:
        return (
            "--engine", "sim",
            "--sim-tokens-per-s", str(self.tokens_per_s),
            "--sim-max-batch", str(self.batch),
            "--max-in-flight", str(self.batch),
            "--sim-ttft-s", str(self.ttft_s),
            "--sim-slowdown-per-seq", str(self.slowdown_per_seq),
            "--sim-max-context", "8192",
            "--sim-prefill-tokens-per-s", str(self.prefill_tokens_per_s),
            "--sim-prefix-cache-blocks", str(self.prefix_cache_blocks),
        )  # fmt: skip

    def step_s(self) -> float:
        """Time between two tokens of one sequence when the batch is full."""
        return (1.0 / self.tokens_per_s) * (1.0 + self.slowdown_per_seq * (self.batch - 1))

    def capacity_rps(self, mean_output_tokens: float) -> float:
        """Requests per second at a full batch: the sim emits its first token after ttft_s and
        one more every step."""
        return self.batch / (self.ttft_s + max(mean_output_tokens - 1.0, 0.0) * self.step_s())


# Two fast workers and two at a third of the speed with a quarter of the slots.
FLEET: tuple[SimWorker, ...] = (
    SimWorker("fast-1", tokens_per_s=75.0, batch=16),
    SimWorker("fast-2", tokens_per_s=75.0, batch=16),
    SimWorker("slow-1", tokens_per_s=25.0, batch=4, prefill_tokens_per_s=1000.0),
    SimWorker("slow-2", tokens_per_s=25.0, batch=4, prefill_tokens_per_s=1000.0),
)


def scaled(fleet: Sequence[SimWorker], speed: float) -> tuple[SimWorker, ...]:
    """The same fleet, every worker `speed` times as fast."""
    return tuple(
        dataclasses.replace(
            w,
            tokens_per_s=w.tokens_per_s * speed,
            prefill_tokens_per_s=w.prefill_tokens_per_s * speed,
        )
        for w in fleet
    )


def mean_of(mix: Mix) -> float:
    return sum(share * (low + high) / 2 for share, low, high in mix) / sum(s for s, _, _ in mix)


def fleet_capacity_rps(fleet: Sequence[SimWorker], mix: Mix = OUTPUT_MIX) -> float:
    return sum(w.capacity_rps(mean_of(mix)) for w in fleet)


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Request:
    """One request of a schedule: when to send it (s from the start), what, and through which
    of the target's instances (workload c uses two)."""

    at_s: float
    messages: tuple[Message, ...]
    max_tokens: int
    kind: str  # "burst" (workload a), "group" (shared system prompt), "turn" (conversation)
    session: str  # the request's group or conversation; "" for a lone request
    instance: int = 0

    def body(self, model: str) -> dict[str, object]:
        messages = [{"role": m.role, "content": m.content} for m in self.messages]
        return {"model": model, "messages": messages, "max_tokens": self.max_tokens}


Schedule = tuple[Request, ...]


def draw(rng: random.Random, mix: Mix) -> int:
    _, low, high = rng.choices(mix, weights=[share for share, _, _ in mix])[0]
    return rng.randint(low, high)


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(_WORDS, k=words))


def poisson(rng: random.Random, start_s: float, end_s: float, rate_rps: float) -> list[float]:
    times: list[float] = []
    now = start_s
    while rate_rps > 0:
        now += rng.expovariate(rate_rps)
        if now >= end_s:
            return times
        times.append(now)
    return times


def bursty_arrivals(
    rng: random.Random,
    duration_s: float,
    rate_rps: float,
    burst_factor: float = 3.0,
    burst_share: float = 0.2,
    period_s: float = 5.0,
) -> list[float]:
    """Poisson arrivals averaging rate_rps, in bursts: each period_s ends with a burst at
    burst_factor times the calm rate, burst_share of the period long. Fixed spells (not random
    ones) keep a short run's mean load at the rate asked, so the load stays what it says."""
    calm = rate_rps / ((1 - burst_share) + burst_share * burst_factor)
    times: list[float] = []
    start = 0.0
    while start < duration_s:
        burst_at = start + period_s * (1 - burst_share)
        end = min(start + period_s, duration_s)
        times += poisson(rng, start, min(burst_at, end), calm)
        times += poisson(rng, burst_at, end, calm * burst_factor)
        start += period_s
    return times


def bursty(seed: int, duration_s: float, rate_rps: float) -> Schedule:
    """(a) Bursty open-loop arrivals, each a lone request of mixed prompt and output length."""
    rng = random.Random(seed)
    return tuple(
        Request(
            at_s=at,
            messages=(Message("user", text(rng, draw(rng, PROMPT_MIX))),),
            max_tokens=draw(rng, OUTPUT_MIX),
            kind="burst",
            session="",
        )
        for at in bursty_arrivals(rng, duration_s, rate_rps)
    )


def conversation(rng: random.Random, name: str, start_s: float) -> list[Request]:
    """All turns of one chat: each resends the system prompt and every earlier turn."""
    history = [Message("system", text(rng, rng.randint(*CHAT_SYSTEM_WORDS)))]
    turns, at = [], start_s
    for _ in range(rng.randint(*TURNS)):
        history.append(Message("user", text(rng, rng.randint(*QUESTION_WORDS))))
        max_tokens = draw(rng, OUTPUT_MIX)
        turns.append(Request(at, tuple(history), max_tokens, "turn", name))
        # The reply the next turn resends: as long as this turn asked for (the sim always
        # answers max_tokens), made here so the schedule does not depend on any target.
        history.append(Message("assistant", text(rng, max_tokens)))
        at += rng.expovariate(1 / THINK_S)
    return turns


def shared_prefix(
    seed: int, duration_s: float, rate_rps: float, groups: int = 4, chat_share: float = 0.5
) -> Schedule:
    """(b) Requests of `groups` apps, each app's requests sharing one long system prompt, mixed
    with multi-turn conversations that resend their history; chat_share of the rate is turns."""
    rng = random.Random(seed)
    prompts = [text(rng, rng.randint(*SYSTEM_WORDS)) for _ in range(groups)]
    weights = [1 / (g + 1) for g in range(groups)]  # a few popular apps, a tail of others
    out: list[Request] = []
    for at in poisson(rng, 0.0, duration_s, rate_rps * (1 - chat_share)):
        g = rng.choices(range(groups), weights=weights)[0]
        question = Message("user", text(rng, rng.randint(*QUESTION_WORDS)))
        system = Message("system", prompts[g])
        out.append(Request(at, (system, question), draw(rng, OUTPUT_MIX), "group", f"g{g}"))
    # Chats start before 0 too, so the window sees late turns as often as first ones.
    warm_s = TURNS[1] * THINK_S
    mean_turns = (TURNS[0] + TURNS[1]) / 2
    starts = poisson(rng, -warm_s, duration_s, rate_rps * chat_share / mean_turns)
    for n, start in enumerate(starts):
        out += [t for t in conversation(rng, f"c{n}", start) if 0.0 <= t.at_s < duration_s]
    return tuple(sorted(out, key=lambda r: r.at_s))


def two_routers(seed: int, duration_s: float, rate_rps: float) -> Schedule:
    """(c) Half the rate of (a) and half of (b) together, alternating between two instances."""
    half = rate_rps / 2
    both = bursty(seed, duration_s, half) + shared_prefix(seed + 1, duration_s, half)
    ordered = sorted(both, key=lambda r: r.at_s)
    return tuple(dataclasses.replace(r, instance=i % 2) for i, r in enumerate(ordered))


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    instances: int  # instances of each target it goes through
    make: Callable[[int, float, float], Schedule]


WORKLOADS: dict[str, Workload] = {
    "a": Workload("a", "bursty open-loop arrivals, mixed lengths", 1, bursty),
    "b": Workload("b", "shared system prompts and multi-turn chats", 1, shared_prefix),
    "c": Workload("c", "(a) + (b) through two instances", 2, two_routers),
}
