"""A connection's transport that sends a response's head with its first body write: one write."""

from __future__ import annotations

import asyncio
from typing import Any

# Past this a body goes in its own write after the held head: copying it to join them would cost
# more than the write saved.
JOIN_LIMIT = 32 * 1024


class HeadJoin:
    """What uvicorn's httptools protocol and its request cycles write through, in place of the
    connection's transport.

    uvicorn (0.54) writes a response's head when the app sends `http.response.start` and its body
    on each `http.response.body`: two writes (two send syscalls) for every whole response. Here
    the first write after `next_is_head()` (the head, or a "100 Continue") is held and joined
    to the next write, which goes out at once; if none comes before the running callback ends
    (a stream awaiting its worker, a HEAD request), a `call_soon` sends it alone, so it is never
    late by more than the callbacks already queued. Everything else passes straight through, in
    order: at most one head is ever held, so the transport's write buffer, and with it uvicorn's
    pause_writing/drain flow control, sees what it saw before; closing sends the held head first.
    """

    __slots__ = ("_flush_due", "_held", "_hold_next", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._held: bytes | None = None
        self._hold_next = True  # a connection's first write is a response's head
        self._flush_due = False

    def next_is_head(self) -> None:
        """The next write begins a response (called once the last one is complete)."""
        self._hold_next = True

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= JOIN_LIMIT:
                self._transport.write(held + data)
                return
            self._transport.write(held)
        elif self._hold_next:
            self._hold_next = False
            self._held = data
            if not self._flush_due:
                self._flush_due = True
                self._loop.call_soon(self._flush_soon)
            return
        self._transport.write(data)

    def _flush_soon(self) -> None:
        self._flush_due = False
        self._release()

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():  # a lost peer reads nothing
            self._transport.write(held)

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def write_eof(self) -> None:
        self._release()
        self._transport.write_eof()

    def close(self) -> None:
        self._release()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        # The rest of the transport, none of which writes (uvicorn calls write, close,
        # is_closing and get_extra_info; its FlowControl holds the real transport).
        return getattr(self._transport, name)
