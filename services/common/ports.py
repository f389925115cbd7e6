"""Listening ports of `switchboard up`: bound by the parent before anything starts, inherited.

`up` binds every HTTP port itself, so a port another program (or another stack) holds is found
before any process starts, without a check-then-bind race; each child serves on the socket it
inherits. The parent keeps the sockets of services it restarts, so nobody can take the port in
between, and several routers share one socket without SO_REUSEPORT, which would also let an
unrelated process join the port.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

from services.common.errors import ServiceError
from services.common.http import bind


class PortError(ServiceError):
    """A port `up` needs is taken, refused or given twice; the message names the flag."""


def _why(port: int, flag: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is in use ({flag})"
    if exc.errno == errno.EACCES:
        return f"port {port} needs privileges ({flag})"
    return f"port {port} cannot be used ({flag}): {exc.strerror or exc}"


def claim(wanted: Sequence[tuple[str, int, str]]) -> dict[int, socket.socket]:
    """Bind each (host, port, flag) once; PortError naming every port taken or given twice."""
    flags: dict[int, tuple[str, str]] = {}
    problems: list[str] = []
    for host, port, flag in wanted:
        if port in flags and flags[port][1] != flag:
            problems.append(f"port {port} is given to both {flags[port][1]} and {flag}")
        flags.setdefault(port, (host, flag))
    claimed: dict[int, socket.socket] = {}
    for port, (host, flag) in flags.items():
        try:
            claimed[port] = bind(host, port)
        except OSError as exc:
            problems.append(_why(port, flag, exc))
    if problems:
        release(claimed)
        raise PortError("; ".join(problems))
    return claimed


def release(claimed: dict[int, socket.socket]) -> None:
    for sock in claimed.values():
        sock.close()
    claimed.clear()


def serving_socket(
    listen_fd: int, host: str, port: int, *, reuse_port: bool = False
) -> socket.socket:
    """The socket `up` handed down (listen_fd >= 0), else a fresh bind of host:port."""
    if listen_fd >= 0:
        return socket.socket(fileno=listen_fd)
    return bind(host, port, reuse_port=reuse_port)
