"""The base error of Switchboard services, the HTTP refusal value every edge uses, and its words."""

from __future__ import annotations

import msgspec


class ServiceError(Exception):
    """Base of every error a Switchboard service raises on purpose."""


class ConfigError(ServiceError):
    """Configuration is missing or out of range; the message names the field."""


class NatsServerError(ServiceError):
    """The embedded nats-server could not be found or started."""


class ApiError(msgspec.Struct, frozen=True, kw_only=True):
    """Every HTTP refusal a service makes, as a value: the OpenAI envelope's fields plus status.

    Cores return it (it is pure); an edge either returns `error_response(err)` or raises
    `Refused(err)`, which every app's exception handlers turn into the same response."""

    status: int
    message: str
    type: str
    code: str
    param: str | None = None
    retry_after_s: int | None = None


class Refused(ServiceError):
    """Raise to answer the request with `error` (services.common.http maps it)."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


def invalid(message: str, code: str = "invalid_value", param: str | None = None) -> ApiError:
    """A 400 for input the caller can fix."""
    return ApiError(
        status=400, message=message, type="invalid_request_error", code=code, param=param
    )


# Why an admission gate refused, in words, per reason (see services.admission.core.Busy).
BUSY_REASONS = {
    "queue_full": "its queue is full",
    "timeout": "no slot freed in time",
    "deadline": "no replica can start it within its time-to-first-token target",
    "draining": "it is shutting down",
}


def at_capacity(who: str, model: str, reason: str, retry_after_s: int) -> ApiError:
    """The one busy refusal, worded once for the router's gateway and for a worker.

    503, not 429: the caller did nothing wrong and a retry later or elsewhere will do
    (docs/worker.md, "Backpressure"); OpenAI clients back off on `rate_limit_exceeded`."""
    why = BUSY_REASONS.get(reason, reason)
    return ApiError(
        status=503,
        message=f"{who} is at capacity for model {model!r} ({why}); retry after {retry_after_s}s",
        type="service_unavailable_error",
        code="rate_limit_exceeded",
        retry_after_s=retry_after_s,
    )
