"""A child process of `up`: its spec, its start (own session, dying with the parent), its output
read as lines that can be cut but never stop the reading, and its health check at start.

A terminal Ctrl-C signals the whole foreground process group; children in their own session
are left alone, so the supervisor can stop them in order (workers drain while NATS is still up).
PR_SET_PDEATHSIG makes a child get SIGTERM if the supervisor itself dies, so nothing is orphaned.
The kernel ties it to the *thread* that forked, so start children from the main thread only.

A child blocks on its next write once nobody empties its pipe, so the reader must keep reading
whatever comes: a line longer than max_bytes keeps its head and says how much was cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import aiohttp
import msgspec

from services.common.errors import ServiceError

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


Printer = Callable[[str, str], None]
# A child that exits 0, or dies of the SIGTERM that asked it to stop, ended as asked.
CLEAN_EXITS = (0, -signal.SIGTERM)


class ServiceSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One child, `python -m <module> *args`; healthy once health_url answers 200."""

    name: str
    module: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = msgspec.field(default_factory=dict)
    health_url: str | None = None
    # restart: start it again after a backoff; report: leave it dead, the fleet goes on (workers:
    # the fleet is built to survive losing them); stop: stop everything.
    on_exit: Literal["restart", "report", "stop"] = "stop"
    # Its NATS user when `up` runs the embedded server with per-role credentials.
    role: str = "operator"
    # The port it serves on: the child inherits the socket `up` bound for it (see ports.py).
    listen_port: int | None = None
    # How long it may take to stop after SIGTERM before it is killed (workers drain first).
    grace_s: float = 20.0


def nats_user(spec: ServiceSpec) -> str:
    """Its NATS user: its role, but each worker its own (named after it), so a worker's
    credential speaks only for that worker (its registry records, its heartbeats)."""
    return spec.name if spec.role == "worker" else spec.role


class StartError(ServiceError):
    """`up` could not start: nothing was left running."""


def private_file(path: Path, text: str) -> Path:
    """Write a file only its owner can read (it holds credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def print_prefixed(name: str, line: str) -> None:
    sys.stdout.write(f"{name:<10} | {line}\n")
    sys.stdout.flush()


class _Output(asyncio.Protocol):
    """A child's stdout and stderr, as prefixed lines; it reads whatever comes, as it comes."""

    def __init__(self, name: str, printer: Printer) -> None:
        self.name, self.printer = name, printer
        self.lines = LineCutter()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        for line in self.lines.feed(data):
            self.printer(self.name, line)

    def connection_lost(self, exc: Exception | None) -> None:
        for line in self.lines.flush():
            self.printer(self.name, line)
        if not self.closed.done():
            self.closed.set_result(None)


class Child:
    def __init__(
        self,
        spec: ServiceSpec,
        proc: asyncio.subprocess.Process,
        output: _Output,
        pipe: asyncio.ReadTransport,
        printer: Printer,
    ) -> None:
        self.spec, self.proc, self.output, self.pipe = spec, proc, output, pipe
        self.printer = printer

    async def output_closed(self, timeout_s: float = 1.0) -> None:
        """Wait for its last words; a process it left behind may hold the pipe, so not forever."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.output.closed), timeout_s)
        self.pipe.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    async def stop(self) -> bool:
        """SIGTERM, SIGKILL after spec.grace_s; True if it ended as asked (or had already)."""
        asked = True
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), self.spec.grace_s)
                asked = self.proc.returncode in CLEAN_EXITS
            except TimeoutError:
                self.printer(
                    "up", f"{self.spec.name} did not stop within {self.spec.grace_s:g}s: killing it"
                )
                self.kill()
                await self.proc.wait()
                asked = False
        await self.output_closed()
        return asked


async def start_child(
    spec: ServiceSpec,
    base_env: dict[str, str],
    printer: Printer,
    listener: socket.socket | None = None,
) -> Child:
    env = {**base_env, **spec.env, "PYTHONUNBUFFERED": "1"}
    if listener is not None:
        env["SWITCHBOARD_LISTEN_FD"] = str(listener.fileno())
    # Our own pipe, not asyncio's PIPE: on Python 3.11 Process.wait() returns only once the
    # pipes are closed, so a child whose output is not read to the end would never be seen exit.
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            spec.module,
            *spec.args,
            env=env,
            stdout=write_fd,
            stderr=write_fd,
            start_new_session=True,
            preexec_fn=die_with_parent,
            pass_fds=() if listener is None else (listener.fileno(),),
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    output = _Output(spec.name, printer)
    pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: output, os.fdopen(read_fd, "rb", buffering=0)
    )
    return Child(spec, proc, output, pipe, printer)


async def wait_healthy(child: Child, timeout_s: float, instance: str = "") -> None:
    """Poll the child's /healthz until it answers 200; fail if it exits or times out first.

    With instance, the answer must come from a process of this `up` (another stack may answer
    on a port this one meant to use).
    """
    if child.spec.health_url is None:
        return
    deadline = time.monotonic() + timeout_s
    # Per request: a socket `up` holds accepts connections even while no child serves it.
    per_try = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=per_try) as session:
        while True:
            if child.proc.returncode is not None:
                raise RuntimeError(
                    f"{child.spec.name} exited with {child.proc.returncode} at start"
                )
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError, TimeoutError):
                async with session.get(child.spec.health_url) as resp:
                    if resp.status == 200:
                        _check_instance(child.spec, await resp.json(), instance)
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.spec.name} not healthy within {timeout_s:.0f}s")
            await asyncio.sleep(0.1)


def _check_instance(spec: ServiceSpec, body: object, instance: str) -> None:
    got = body.get("instance") if isinstance(body, dict) else None
    if instance and got != instance:
        raise RuntimeError(
            f"{spec.name}: {spec.health_url} is answered by another process "
            f"(instance {got!r}, this `up` is {instance!r})"
        )
