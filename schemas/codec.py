"""JSON codec for the wire: encoders and typed decoders built once per process. No I/O."""

from __future__ import annotations

import re
from typing import Any, Generic, TypeVar

import msgspec

from schemas.base import Envelope
from schemas.capacity import CapacityView
from schemas.errors import ErrorBody, ErrorEnvelope
from schemas.kv import KvBlocks
from schemas.load import WorkerLoad
from schemas.registry import CommandReply, RegistryEvent, RegistrySnapshot

T = TypeVar("T")

DecodeError: tuple[type[Exception], ...] = (msgspec.DecodeError, msgspec.ValidationError)


def _too_deep() -> msgspec.DecodeError:
    # msgspec recurses once per nesting level and gives up with RecursionError when the stack
    # runs out (about 1,000 levels: a 2 KB body). That is bad input like any other, not a crash.
    return msgspec.DecodeError("JSON is nested too deeply")


class Decoder(Generic[T]):
    """msgspec's typed JSON decoder, built once; nesting too deep is a DecodeError like the rest."""

    def __init__(self, type_: Any) -> None:  # Any: unions and generic aliases are types here too
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(type_)

    def decode(self, data: bytes | str) -> T:
        try:
            return self._decoder.decode(data)
        except RecursionError:
            raise _too_deep() from None


_encoder = msgspec.json.Encoder()
registry_event_decoder: Decoder[Envelope[RegistryEvent]] = Decoder(Envelope[RegistryEvent])
load_decoder: Decoder[Envelope[WorkerLoad]] = Decoder(Envelope[WorkerLoad])
capacity_view_decoder: Decoder[Envelope[CapacityView]] = Decoder(Envelope[CapacityView])
kv_decoder: Decoder[Envelope[KvBlocks]] = Decoder(Envelope[KvBlocks])
capacity_decoder: Decoder[CapacityView] = Decoder(CapacityView)
snapshot_decoder: Decoder[RegistrySnapshot] = Decoder(RegistrySnapshot)
command_reply_decoder: Decoder[CommandReply] = Decoder(CommandReply)
# The operator's view decodes any envelope without knowing its body type.
any_envelope_decoder: Decoder[Envelope[Any]] = Decoder(Envelope[Any])


def encode(value: object) -> bytes:
    """Encode any wire value as JSON bytes."""
    return _encoder.encode(value)


def decode(data: bytes | str, type_: type[T]) -> T:
    """Decode JSON into `type_`; raises msgspec.DecodeError / ValidationError on bad input."""
    try:
        return msgspec.json.decode(data, type=type_)
    except RecursionError:
        raise _too_deep() from None


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
