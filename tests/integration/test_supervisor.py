"""`up`'s supervisor with real child processes: report, restart with backoff, crash-loop stop;
long log lines, hung children, a killed nats-server, stubborn children, clean exits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from services.cli.child import MAX_LINE_BYTES, ServiceSpec
from services.cli.supervisor import supervise
from services.cli.watch import Liveness, RestartBudget
from services.common.http import bind
from tests.helpers import eventually, free_port

pytestmark = pytest.mark.integration


def child(name: str, sleep_s: float, code: int, on_exit: str) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        module="tests.child_exit",
        args=(str(sleep_s), str(code)),
        on_exit=on_exit,  # type: ignore[arg-type]
    )


async def run(
    specs: list[ServiceSpec], tmp_path: Path, stop_after_s: float | None
) -> tuple[int, list[str]]:
    lines: list[str] = []
    stop = asyncio.Event()

    async def stopper() -> None:
        if stop_after_s is not None:
            await eventually(lambda: any("exited" in line for line in lines), timeout_s=20)
            # a window, not a wait for an outcome: what must NOT happen after the exit (a
            # restart, a second report) would show within it
            await asyncio.sleep(stop_after_s)
            stop.set()

    task = asyncio.create_task(stopper())
    code = await supervise(
        specs,
        nats_url="nats://127.0.0.1:1",  # no embedded NATS; these children never connect
        state_dir=tmp_path,
        nats_port=0,
        stop=stop,
        printer=lambda name, line: lines.append(f"{name} | {line}"),
        restart_budget=RestartBudget(first_s=0.05, max_s=0.1, max_restarts=2, window_s=60),
    )
    task.cancel()
    return code, lines


async def test_a_reported_child_is_reported_once_and_the_rest_goes_on(tmp_path: Path) -> None:
    code, lines = await run(
        [child("steady", 30, 0, "stop"), child("flaky", 0.1, 3, "report")],
        tmp_path,
        stop_after_s=1.0,
    )
    assert code == 1  # something died: up says so at the end
    reports = [line for line in lines if "flaky exited with code 3" in line]
    assert len(reports) == 1, lines
    assert "it is not restarted" in reports[0]
    assert "flaky | child done" in lines  # its last words come out before the report
    assert lines[-1] == "up | stopped"


async def test_a_restarted_child_comes_back_until_it_crash_loops(tmp_path: Path) -> None:
    code, lines = await run(
        [child("steady", 30, 0, "stop"), child("crashy", 0.2, 1, "restart")],
        tmp_path,
        stop_after_s=None,
    )
    assert code == 1
    restarts = [line for line in lines if "crashy exited with code 1; restarting it in" in line]
    assert len(restarts) == 2, lines  # max_restarts=2, then a crash loop
    assert any(
        "crashy exited with code 1; it keeps crashing: stopping everything" in line
        for line in lines
    )
    assert sum("crashy | child done" in line for line in lines) == 3


async def test_an_essential_child_stops_everything(tmp_path: Path) -> None:
    code, lines = await run(
        [child("steady", 30, 0, "stop"), child("core", 0.1, 2, "stop")], tmp_path, None
    )
    assert code == 1
    essential = "core exited with code 2; it is essential: stopping everything"
    assert any(essential in line for line in lines)


async def test_a_health_check_answered_by_another_stack_fails_the_start(tmp_path: Path) -> None:
    """The port answers 200, but not from the child `up` started: never "healthy"."""

    async def other_stack(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"ok": true, "instance": "0123456789ab"}'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(other_stack, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spec = ServiceSpec(
        name="registry",
        module="tests.child_exit",
        args=("30", "0"),
        health_url=f"http://127.0.0.1:{port}/healthz",
    )
    try:
        code, lines = await run([spec], tmp_path, stop_after_s=None)
    finally:
        server.close()
        await server.wait_closed()
    assert code == 1
    failed = [line for line in lines if "start failed" in line]
    assert len(failed) == 1, lines
    assert f"http://127.0.0.1:{port}/healthz is answered by another process" in failed[0]
    assert "instance '0123456789ab'" in failed[0]


# ---- supervision of real services: their output, their health, NATS, stopping ----


def fake(
    name: str,
    mode: str,
    listeners: dict[int, socket.socket],
    *args: str,
    **fields: Any,
) -> ServiceSpec:
    """A tests/fake_service.py child serving /healthz on a socket `up` holds, as services do."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    listeners[port] = sock
    fields.setdefault("on_exit", "report")
    return ServiceSpec(
        name=name,
        module="tests.fake_service",
        args=(mode, *args),
        health_url=f"http://127.0.0.1:{port}/healthz",
        listen_port=port,
        **fields,
    )


async def supervised(
    specs: list[ServiceSpec],
    tmp_path: Path,
    act: Callable[[list[str]], Awaitable[None]],
    listeners: dict[int, socket.socket],
    **options: Any,
) -> tuple[int, list[str], float]:
    """Run supervise until act (started once the stack is up) returns, then stop it as Ctrl-C
    does; (exit code, lines printed, seconds from the stop to supervise's return)."""
    lines: list[str] = []
    stop, ready = asyncio.Event(), asyncio.Event()
    stopped_at = 0.0

    async def acting() -> None:
        nonlocal stopped_at
        await ready.wait()
        try:
            await act(lines)
        finally:
            stopped_at = time.monotonic()
            stop.set()

    task = asyncio.create_task(acting())
    options.setdefault("nats_url", "nats://127.0.0.1:1")
    options.setdefault("nats_port", 0)
    code = await supervise(
        specs,
        state_dir=tmp_path,
        stop=stop,
        on_ready=ready.set,
        printer=lambda name, line: lines.append(f"{name} | {line}"),
        restart_budget=RestartBudget(first_s=0.05, max_s=0.1, max_restarts=2, window_s=60),
        listeners=listeners,
        **options,
    )
    returned_at = time.monotonic()
    if not ready.is_set():
        task.cancel()
        raise AssertionError(f"the stack did not come up: {lines}")
    await task  # act's own failure comes out here
    return code, lines, returned_at - stopped_at


def pid_of(lines: list[str], name: str) -> int:
    return next(int(line.split()[-1]) for line in lines if line.startswith(f"{name} | pid "))


def said(lines: list[str], text: str) -> bool:
    return any(text in line for line in lines)


def poke(path: Path) -> None:
    path.touch()


def nats_server_pid(data_dir: Path) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"nats-server") and str(data_dir).encode() in argv:
                    return int(entry.name)
    raise AssertionError(f"no nats-server with {data_dir}")


async def test_a_megabyte_log_line_is_cut_and_never_blocks_the_child(tmp_path: Path) -> None:
    listeners: dict[int, socket.socket] = {}

    async def act(lines: list[str]) -> None:
        # It goes on logging (and would block on a full pipe if nobody read it)...
        await eventually(lambda: "chatty | tick 100" in lines, timeout_s=20)
        # ...and its death is seen and reported.
        os.kill(pid_of(lines, "chatty"), signal.SIGKILL)
        await eventually(lambda: said(lines, "chatty exited with code -9"), timeout_s=5)

    code, lines, _ = await supervised(
        [fake("chatty", "bigline", listeners)], tmp_path, act, listeners
    )
    big = [line for line in lines if line.startswith("chatty | xxx")]
    assert len(big) == 1
    assert big[0].endswith(f"x…({1_000_000 - MAX_LINE_BYTES} bytes cut)")
    assert len(big[0]) < MAX_LINE_BYTES + 100
    assert code == 1


async def test_a_child_that_stops_answering_is_killed_and_restarted(tmp_path: Path) -> None:
    listeners: dict[int, socket.socket] = {}
    trigger = tmp_path / "hang"
    spec = fake("stuck", "hang", listeners, str(trigger), on_exit="restart")

    async def act(lines: list[str]) -> None:
        poke(trigger)
        await eventually(lambda: "stuck | hanging" in lines, timeout_s=10)
        # 3 misses of 1 s, 0.1 s apart; the restart itself; and room for a slow machine
        await eventually(lambda: said(lines, "stuck restarted and healthy"), timeout_s=15)

    code, lines, _ = await supervised(
        [spec], tmp_path, act, listeners, liveness=Liveness(interval_s=0.1, timeout_s=1.0)
    )
    hung = f"up | stuck did not answer {spec.health_url} 3 times in a row (1s each, every 0.1s)"
    assert said(lines, hung + ": it is hung, killing it"), [x for x in lines if "tick" not in x]
    assert said(lines, "stuck exited with code -9; restarting it in")
    assert code == 1


async def test_a_killed_nats_server_is_restarted_on_its_port_with_its_data(
    tmp_path: Path,
) -> None:
    listeners: dict[int, socket.socket] = {}
    port = free_port()
    trigger = tmp_path / "read"
    spec = fake("keeper", "kv", listeners, str(trigger), role="registry", on_exit="restart")

    async def act(lines: list[str]) -> None:
        await eventually(lambda: "keeper | kv put" in lines, timeout_s=20)
        os.kill(nats_server_pid(tmp_path / "nats"), signal.SIGKILL)
        await eventually(
            lambda: said(lines, f"nats-server restarted at nats://127.0.0.1:{port}"), timeout_s=20
        )

        def read_back() -> bool:
            poke(trigger)  # the child reads the value over its (reconnected) connection
            return said(lines, "keeper | kv got")

        await eventually(read_back, timeout_s=20, interval_s=0.2)

    code, lines, _ = await supervised(
        [spec], tmp_path, act, listeners, nats_url=None, nats_port=port
    )
    assert said(lines, "up | nats-server exited with code -9; restarting it in"), lines
    assert f"(port {port}, same data and config)" in next(x for x in lines if "code -9" in x)
    assert "keeper | kv got b'written before'" in lines
    assert not said(lines, "keeper exited")  # the services went on
    assert code == 1


async def test_ctrl_c_kills_a_child_that_ignores_sigterm_after_its_grace(tmp_path: Path) -> None:
    listeners: dict[int, socket.socket] = {}

    async def act(lines: list[str]) -> None:
        await eventually(lambda: "mule | tick 2" in lines, timeout_s=10)

    code, lines, stopped_in = await supervised(
        [fake("mule", "stubborn", listeners, grace_s=0.5)], tmp_path, act, listeners
    )
    assert "up | mule did not stop within 0.5s: killing it" in lines
    assert stopped_in < 0.5 + 3.0
    assert code == 1  # it did not end as asked


async def test_up_exits_0_when_every_child_ended_as_asked(tmp_path: Path) -> None:
    listeners: dict[int, socket.socket] = {}
    specs = [fake("worker-1", "drain", listeners), fake("worker-2", "drain", listeners)]

    async def act(lines: list[str]) -> None:
        await eventually(lambda: "worker-1 | tick 2" in lines, timeout_s=10)
        os.kill(pid_of(lines, "worker-1"), signal.SIGTERM)  # an operator drains one worker
        await eventually(lambda: said(lines, "worker-1 exited with code 0"), timeout_s=10)

    code, lines, _ = await supervised(specs, tmp_path, act, listeners)
    assert "worker-1 | drained" in lines
    assert said(lines, "worker-1 exited with code 0 (a clean exit); it is not restarted")
    assert "worker-2 | drained" in lines  # stopped by the Ctrl-C, cleanly
    assert code == 0
