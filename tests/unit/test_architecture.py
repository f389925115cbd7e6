"""Cores stay pure: core.py files and common/seq.py import no I/O, clock or randomness module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "asyncio",
    "nats",
    "starlette",
    "uvicorn",
    "aiohttp",
    "prometheus_client",
    "logging",
    "time",
    "random",
    "os",
    "torch",
    "exllamav2",
}
PURE_FILES = [
    *sorted(ROOT.glob("services/*/core.py")),
    ROOT / "services/common/seq.py",
    ROOT / "services/common/follow.py",
    ROOT / "services/common/admission.py",
    ROOT / "services/worker/stops.py",
    *sorted(ROOT.glob("schemas/*.py")),
]


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_modules_import_no_io(path: Path) -> None:
    assert not imported_roots(path) & FORBIDDEN, (
        f"{path} imports {imported_roots(path) & FORBIDDEN}"
    )


def test_rule_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "core.py"
    bad.write_text("import time\nfrom asyncio import sleep\nfrom . import local\n")
    assert imported_roots(bad) & FORBIDDEN == {"time", "asyncio"}


def test_every_module_has_a_docstring() -> None:
    missing = [
        str(p.relative_to(ROOT))
        for p in [*ROOT.glob("schemas/*.py"), *ROOT.glob("services/**/*.py")]
        if ast.get_docstring(ast.parse(p.read_text())) is None and p.read_text().strip()
    ]
    assert missing == []
