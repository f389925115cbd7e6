"""Prompt blocks for prefix-cache-aware routing: the one definition router and worker share. Pure.

A prompt is cut into blocks of BLOCK_BYTES bytes of its canonical text (chat: each message's role
and text, with separators no text contains; completions: the prompt); block i is named by a hash
chained over blocks 0..i, so two prompts share block i's hash exactly when they share everything up
to the end of block i. Only full blocks count (a KV cache holds whole pages). The router hashes the
request it forwards and the worker the request it serves, with this code, so both name the same
blocks without tokenizing: no tokenizer in the router, and the same boundaries for every engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Iterable

import msgspec

BLOCK_BYTES = 256  # about 64 tokens of English text
MAX_BLOCKS = 4096  # 1 MiB of prompt: past that, later blocks are not hashed (bounded work)
_ROLE_END, _TEXT_END = b"\x1e", b"\x1f"  # ASCII record/unit separators


class Part(msgspec.Struct, frozen=True):
    """One content part; only text parts count (as schemas.inference.ChatMessage.text())."""

    type: str = "text"
    text: str | None = None


class Message(msgspec.Struct, frozen=True):
    role: str = ""
    content: str | list[Part] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content if part.type == "text")


class PromptFields(msgspec.Struct, frozen=True):
    """What the router reads of a request's prompt (lenient: unknown fields ignored)."""

    messages: list[Message] | None = None
    prompt: str | list[str] | None = None


def chat_text(messages: Iterable[tuple[str, str]]) -> bytes:
    """The canonical bytes of a chat: (role, text) pairs, in order."""
    return b"".join(utf8(role) + _ROLE_END + utf8(text) + _TEXT_END for role, text in messages)


def prompt_text(fields: PromptFields) -> bytes:
    """The canonical bytes of a decoded request's prompt (b"" when it has none)."""
    if fields.messages is not None:
        return chat_text((m.role, m.text()) for m in fields.messages)
    if isinstance(fields.prompt, list):
        return utf8(fields.prompt[0]) if fields.prompt else b""
    return utf8(fields.prompt or "")


def utf8(text: str) -> bytes:
    """Bytes of any str, a lone surrogate included (JSON can carry one; the worker reads it so)."""
    return text.encode("utf-8", "surrogatepass")


def block_hashes(text: bytes, block_bytes: int = BLOCK_BYTES) -> tuple[int, ...]:
    """Chained 63-bit hashes of the full blocks of `text` (63 bits: a JSON integer every
    decoder reads exactly)."""
    hashes: list[int] = []
    previous = b""
    full = min(len(text) // block_bytes, MAX_BLOCKS)
    for i in range(full):
        digest = hashlib.blake2b(
            previous + text[i * block_bytes : (i + 1) * block_bytes], digest_size=8
        ).digest()
        previous = digest
        hashes.append(int.from_bytes(digest, "big") >> 1)
    return tuple(hashes)


def shared_blocks(request: tuple[int, ...], held: Container[int]) -> int:
    """How many leading blocks of `request` a cache holding `held` has (a chain: stop at the
    first miss, since a later block's hash already names its whole prefix)."""
    count = 0
    for block in request:
        if block not in held:
            break
        count += 1
    return count
