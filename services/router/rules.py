"""The router's own refusals (one table to HTTP), retry budget and priority caps. Pure, no I/O."""

from __future__ import annotations

import msgspec

from services.common.errors import ApiError, at_capacity
from services.router.core import NoChoice, UnknownModel

# ---- refusals the router itself makes: the one table from outcome to HTTP ----

PENDING_RETRY_AFTER_S = 2  # a replica is starting (rolling update): soon worth another try
NO_REPLICA_RETRY_AFTER_S = 5


def no_choice_error(why: NoChoice) -> ApiError:
    if isinstance(why, UnknownModel):
        return ApiError(
            status=404,
            message=f"model {why.model!r} is not served by any worker",
            type="invalid_request_error",
            code="model_not_found",
            param="model",
        )
    wait = PENDING_RETRY_AFTER_S if why.pending else NO_REPLICA_RETRY_AFTER_S
    suffix = " (a replica is starting)" if why.pending else ""
    return ApiError(
        status=503,
        message=f"no replica can take model {why.model!r} now: {why.reason}{suffix}",
        type="service_unavailable_error",
        code="no_replica_available",
        retry_after_s=wait,
    )


def gateway_busy(model: str, reason: str, retry_after_s: int) -> ApiError:
    """This router's gateway refuses: no replica can take the request within its TTFT target
    ("deadline"), its queue is full, a wait ran out ("timeout"), or it is draining."""
    return at_capacity("the fleet", model, reason, retry_after_s)


def upstream_unreachable(detail: str) -> ApiError:
    """The last attempt could not connect to its worker (before any byte of an answer)."""
    return ApiError(
        status=502,
        message=f"upstream worker unreachable: {detail}",
        type="server_error",
        code="upstream_unreachable",
    )


class PriorityCaps(msgspec.Struct, frozen=True, kw_only=True):
    """The highest x-switchboard-priority a request may ask for, per API key.

    A higher ask is clamped, not refused: priority is a scheduling hint, and a client that sends
    one header value under several keys should still be served, just not ahead of its grant."""

    default: int = 0
    per_key: dict[str, int] = msgspec.field(default_factory=dict)

    def allowed(self, asked: int, key: str | None) -> int:
        cap = self.default if key is None else self.per_key.get(key, self.default)
        return min(asked, cap)


class RetryBudget:
    """Retries may add at most `ratio` of the request volume (plus a small floor), so a fleet in
    trouble is not hit by a retry storm. Each request deposits `ratio`; each retry costs 1."""

    def __init__(self, ratio: float = 0.2, floor: float = 10.0, cap: float = 100.0) -> None:
        self.ratio, self.cap = ratio, cap
        self.tokens = floor

    def request(self) -> None:
        self.tokens = min(self.tokens + self.ratio, self.cap)

    def try_retry(self) -> bool:
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def parse_retry_after(value: str | None, default_s: float = 1.0) -> float:
    """Seconds from a Retry-After header (delta-seconds form); default when absent or odd."""
    if value is None:
        return default_s
    try:
        return max(float(value.strip()), 0.0)
    except ValueError:
        return default_s
