"""The OpenAI error envelope used by every HTTP error Switchboard returns. No I/O."""

from __future__ import annotations

from schemas.base import WireStruct


class ErrorBody(WireStruct, frozen=True, kw_only=True):
    """OpenAI's error object: message for people, type and code for programs."""

    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorEnvelope(WireStruct, frozen=True, kw_only=True):
    """{"error": {...}}, the body of every non-2xx response."""

    error: ErrorBody
