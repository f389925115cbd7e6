"""Supervised child processes: started in their own session, dying with the parent; their output
read as lines that can be cut but never stop the reading.

A terminal Ctrl-C signals the whole foreground process group; children in their own session
are left alone, so the supervisor can stop them in order (workers drain while NATS is still up).
PR_SET_PDEATHSIG makes a child get SIGTERM if the supervisor itself dies, so nothing is orphaned.
The kernel ties it to the *thread* that forked, so start children from the main thread only.

A child blocks on its next write once nobody empties its pipe, so the reader must keep reading
whatever comes: a line longer than max_bytes keeps its head and says how much was cut.
"""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1
MAX_LINE_BYTES = 16 * 1024


def die_with_parent() -> None:
    """preexec_fn for subprocess: ask the kernel for SIGTERM when our parent exits (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class LineCutter:
    """Pure: bytes in as they come, whole lines out; memory stays within max_bytes per line."""

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._head = bytearray()
        self._cut = 0

    def feed(self, data: bytes) -> list[str]:
        """The lines data completes (without their newline)."""
        lines = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._keep(data[start:end])
            lines.append(self._take())
            start = end + 1
        self._keep(data[start:])
        return lines

    def flush(self) -> list[str]:
        """At end of output: the last line if it had no newline."""
        return [self._take()] if self._head or self._cut else []

    def _keep(self, piece: bytes) -> None:
        room = max(self.max_bytes - len(self._head), 0)
        self._head += piece[:room]
        self._cut += max(len(piece) - room, 0)

    def _take(self) -> str:
        line = self._head.decode(errors="replace").removesuffix("\r")
        if self._cut:
            line += f"…({self._cut} bytes cut)"
        self._head.clear()
        self._cut = 0
        return line
