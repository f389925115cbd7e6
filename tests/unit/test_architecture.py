"""Cores stay pure: every core.py and what it imports from here use no I/O, clock or randomness."""

from __future__ import annotations

import ast
import re
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


def says_pure(path: Path) -> bool:
    """A module declares itself pure in its docstring ("... Pure, no I/O.")."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return re.search(r"\bpure\b", doc, re.IGNORECASE) is not None


# The roots of purity: every core.py there is, every module whose docstring says it is pure, and
# the wire types. What they import from this project must be pure too: the check follows imports.
PURE_ROOTS = sorted(
    {
        *ROOT.glob("services/**/core.py"),
        *(p for p in ROOT.glob("services/**/*.py") if says_pure(p)),
        *ROOT.glob("schemas/*.py"),
    }
)


def module_path(module: str) -> Path | None:
    """The file of one of this project's modules (services.x.y / schemas.z), None for others."""
    if module.split(".")[0] not in ("services", "schemas"):
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def project_imports(path: Path) -> set[Path]:
    """This project's modules that `path` imports (`from a.b import c` may name module a.b.c)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        found.update(p for p in map(module_path, names) if p is not None)
    return found


def pure_closure(root: Path) -> list[Path]:
    """root and every project module it reaches through imports."""
    seen, todo = {root}, [root]
    while todo:
        for reached in project_imports(todo.pop()) - seen:
            seen.add(reached)
            todo.append(reached)
    return sorted(seen)


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_every_service_has_a_core() -> None:
    cores = {p.parent.name for p in ROOT.glob("services/*/core.py")}
    assert {"registry", "capacity", "router", "worker", "admission"} <= cores


@pytest.mark.parametrize("root", PURE_ROOTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_modules_import_no_io(root: Path) -> None:
    impure = {
        str(p.relative_to(ROOT)): sorted(imported_roots(p) & FORBIDDEN)
        for p in pure_closure(root)
        if imported_roots(p) & FORBIDDEN
    }
    assert impure == {}, f"{root.relative_to(ROOT)} reaches I/O through {impure}"


def test_closure_follows_imports_to_an_impure_module(tmp_path: Path) -> None:
    """The rule sees I/O one import away: services/router/core.py -> shell.py (asyncio)."""
    bad = tmp_path / "core.py"
    bad.write_text("from services.router.shell import RouterShell\n")
    reached = {p.relative_to(ROOT).as_posix() for p in project_imports(bad)}
    assert reached == {"services/router/shell.py"}
    assert "asyncio" in imported_roots(ROOT / "services/router/shell.py")


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
