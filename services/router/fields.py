"""What the router reads of a completion request's body: its routing fields and its prompt, decoded
once; the body itself is forwarded byte for byte."""

from __future__ import annotations

import msgspec

from schemas.inference import MAX_N
from schemas.prefix import Message, PromptFields, block_hashes, prompt_text
from services.common.http import decode_body
from services.router.policy import Prompt

MAX_SLOTS = MAX_N  # the most choices a request may ask for


class RoutingFields(msgspec.Struct, frozen=True):
    """The parts of a request that route it (a bad one is the router's 400)."""

    model: str
    stream: bool | None = None  # null: the default, as OpenAI reads it (unused for routing)
    # Choices run at once on the worker, each in a slot. Read leniently: the worker judges the
    # values (a bad one is its 400), the router only counts plausible ones.
    n: object = 1
    best_of: object = None

    @property
    def slots(self) -> int:
        """What the request takes on a worker: its n (or best_of) when that is a plausible
        count, else 1 (the worker refuses it anyway)."""
        counts = [c for c in (self.n, self.best_of) if type(c) is int and 1 <= c <= MAX_SLOTS]
        return max(counts, default=1)


class RequestFields(RoutingFields, frozen=True):
    """The routing fields and the prompt (schemas.prefix.PromptFields' fields) in one decode."""

    messages: list[Message] | None = None
    prompt: str | list[str] | None = None


_request_decoder = msgspec.json.Decoder(RequestFields)
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


def read_fields(body: bytes) -> RoutingFields:
    """The request's fields, its prompt included when that decodes; Refused 400 (decode_body's)
    when the routing fields do not. A prompt that does not decode is not the router's to judge:
    the worker refuses it, and the request is routed without one."""
    try:
        return _request_decoder.decode(body)
    except _DECODE_ERRORS:
        # Rare: decoded again, apart, for decode_body's error or the routing fields alone.
        return decode_body(body, RoutingFields)


def prompt_of(fields: RoutingFields) -> Prompt:
    """The prompt's estimated tokens and block hashes, for the replica choice."""
    if not isinstance(fields, RequestFields):
        return Prompt()
    try:
        text = prompt_text(PromptFields(messages=fields.messages, prompt=fields.prompt))
    except UnicodeError:
        return Prompt()
    return Prompt.of(len(text), block_hashes(text))
