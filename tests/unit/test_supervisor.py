"""`up`'s restart policy and the plan of what it runs."""

from __future__ import annotations

from services.cli.stack import StackOptions, plan
from services.cli.watch import RestartBudget


def test_restart_backoff_doubles_and_a_crash_loop_gives_up() -> None:
    budget = RestartBudget(first_s=0.5, max_s=3.0, max_restarts=4, window_s=60)
    assert [budget.delay("registry", t) for t in (0, 1, 2, 3)] == [0.5, 1.0, 2.0, 3.0]
    assert budget.delay("registry", 4) is None  # a 5th crash within a minute: stop everything
    assert budget.delay("capacity", 4) == 0.5  # each service has its own history
    assert budget.delay("registry", 100) == 0.5  # old crashes age out of the window


def test_control_plane_restarts_and_workers_are_reported() -> None:
    specs = {s.name: s for s in plan(StackOptions(workers=2, routers=2))}
    assert list(specs) == ["registry", "capacity", "worker-1", "worker-2", "router-1", "router-2"]
    assert {specs[n].on_exit for n in ("registry", "capacity", "router-1", "router-2")} == {
        "restart"
    }
    assert {specs[n].on_exit for n in ("worker-1", "worker-2")} == {"report"}
    assert all(s.module.startswith("services.") for s in specs.values())
    assert specs["router-2"].args[-1] == "0.500000"  # each router takes half the capacity
