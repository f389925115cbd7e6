"""How supervised child processes are started: in their own session, and dying with the parent.

A terminal Ctrl-C signals the whole foreground process group; children in their own session
are left alone, so the supervisor can stop them in order (workers drain while NATS is still up).
PR_SET_PDEATHSIG makes a child get SIGTERM if the supervisor itself dies, so nothing is orphaned.
The kernel ties it to the *thread* that forked, so start children from the main thread only.
"""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn for subprocess: ask the kernel for SIGTERM when our parent exits (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
