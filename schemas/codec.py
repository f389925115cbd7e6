"""JSON codec for the wire: encoders and typed decoders built once per process. No I/O."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from schemas.base import Envelope
from schemas.capacity import CapacityView
from schemas.errors import ErrorBody, ErrorEnvelope
from schemas.load import WorkerLoad
from schemas.registry import CommandReply, RegistryEvent, RegistrySnapshot

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
registry_event_decoder = msgspec.json.Decoder(Envelope[RegistryEvent])
load_decoder = msgspec.json.Decoder(Envelope[WorkerLoad])
capacity_view_decoder = msgspec.json.Decoder(Envelope[CapacityView])
capacity_decoder = msgspec.json.Decoder(CapacityView)
snapshot_decoder = msgspec.json.Decoder(RegistrySnapshot)
command_reply_decoder = msgspec.json.Decoder(CommandReply)
# The operator's view decodes any envelope without knowing its body type.
any_envelope_decoder = msgspec.json.Decoder(Envelope[Any])

DecodeError: tuple[type[Exception], ...] = (msgspec.DecodeError, msgspec.ValidationError)


def encode(value: object) -> bytes:
    """Encode any wire value as JSON bytes."""
    return _encoder.encode(value)


def decode(data: bytes | str, type_: type[T]) -> T:
    """Decode JSON into `type_`; raises msgspec.DecodeError / ValidationError on bad input."""
    return msgspec.json.decode(data, type=type_)


_FIELD = re.compile(r"at `\$\.(\w+)")


def error_field(message: str) -> str | None:
    """The top-level field a msgspec ValidationError message points at (`... - at `$.x[0]``)."""
    match = _FIELD.search(message)
    return match.group(1) if match else None


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    """The JSON bytes of an OpenAI error envelope."""
    return encode(
        ErrorEnvelope(error=ErrorBody(message=message, type=type_, code=code, param=param))
    )


def error_event(message: str, type_: str, code: str) -> bytes:
    """An SSE event carrying the error envelope, for failures after the first byte was sent."""
    return b"data: " + error_body(message, type_, code) + b"\n\n"
