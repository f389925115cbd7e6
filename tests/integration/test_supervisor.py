"""`up`'s supervisor with real child processes: report, restart with backoff, crash-loop stop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.supervisor import RestartBudget, ServiceSpec, supervise
from tests.helpers import eventually

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
