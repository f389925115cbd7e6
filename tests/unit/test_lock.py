"""The locks in requirements/ agree with pyproject.toml: each requirement pinned in its range."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tools.lock import (
    BUILD_LOCK,
    DIGEST_LINE,
    LOCK_DIR,
    LOCKS,
    build_requirements,
    pyproject_digest,
)

ROOT = LOCK_DIR.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RELOCK = "pyproject.toml and requirements/ disagree: run `make lock` and commit requirements/"


def pins(lock: Path) -> dict[str, list[tuple[Version, Requirement]]]:
    """name -> the (version, line) pins in a lock; a universal lock may pin one name per marker."""
    out: dict[str, list[tuple[Version, Requirement]]] = {}
    for raw in lock.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # exactly one specifier, and it must be ==
        assert spec.operator == "==", f"{lock.name}: {line!r} is not an exact pin"
        out.setdefault(canonicalize_name(req.name), []).append((Version(spec.version), req))
    return out


def direct_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def disagreements(lock: Path, wanted: list[Requirement]) -> list[str]:
    """Each requirement of pyproject that the lock does not pin inside its range."""
    pinned = pins(lock)
    problems = []
    for req in wanted:
        found = pinned.get(canonicalize_name(req.name), [])
        if not found:
            problems.append(f"{req.name} is not in {lock.name}")
        for version, _ in found:
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{lock.name} pins {req.name}=={version}, outside {req.specifier}")
    return problems


@pytest.mark.parametrize("name", [BUILD_LOCK, *LOCKS])
def test_each_lock_was_made_from_this_pyproject(name: str) -> None:
    lock = LOCK_DIR / f"{name}.txt"
    assert lock.is_file(), RELOCK
    digests = [ln for ln in lock.read_text().splitlines() if ln.startswith(DIGEST_LINE)]
    assert digests == [DIGEST_LINE + pyproject_digest()], f"{lock.name}: {RELOCK}"


@pytest.mark.parametrize("name", list(LOCKS))
def test_each_lock_pins_every_requirement_inside_its_range(name: str) -> None:
    extras, _ = LOCKS[name]
    assert disagreements(LOCK_DIR / f"{name}.txt", direct_requirements(extras)) == []


def test_build_lock_pins_pip_and_the_build_backend() -> None:
    wanted = [Requirement(r) for r in build_requirements()]
    assert disagreements(LOCK_DIR / "build.txt", wanted) == []


def test_the_cpu_locks_hold_no_cuda_wheels() -> None:
    # the CPU build of torch has no nvidia-* or triton dependencies; finding them means the lock
    # was resolved against PyPI's CUDA build and `make up` would download several GB
    for name in ("run", "dev"):
        names = pins(LOCK_DIR / f"{name}.txt")
        assert "torch" in names
        assert [n for n in names if n.startswith("nvidia-") or n == "triton"] == []


def test_a_range_the_lock_misses_is_reported(tmp_path: Path) -> None:
    lock = tmp_path / "x.txt"
    lock.write_text("aiohttp==3.9.0\n    # via x\n")
    wanted = [Requirement("aiohttp>=3.10"), Requirement("msgspec>=0.19")]
    assert disagreements(lock, wanted) == [
        "x.txt pins aiohttp==3.9.0, outside >=3.10",
        "msgspec is not in x.txt",
    ]


def test_a_changed_pyproject_changes_the_digest(tmp_path: Path) -> None:
    text = (ROOT / "pyproject.toml").read_text()
    changed = tmp_path / "pyproject.toml"
    changed.write_text(text.replace('"msgspec>=0.19"', '"msgspec>=0.20"'))
    assert pyproject_digest(changed) != pyproject_digest()
    same = tmp_path / "same.toml"
    same.write_text(text.replace('description = "', 'description = "An '))
    assert pyproject_digest(same) == pyproject_digest()
