"""Regenerate requirements/*.txt, the locks `make up`, `make test` and the images install from."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = ROOT / "requirements"

# Each lock: the extras it holds and the Python it is resolved for. The CPU locks are resolved for
# this project's oldest Python on Linux x86-64 (what CI and the images run); the GPU lock is
# universal, because GPU hosts run newer Pythons (3.12 on the lent H100/H200 machines).
LOCKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "run": (("cpu", "client"), ("--python-version", "3.11")),
    "dev": (("dev", "cpu", "client"), ("--python-version", "3.11")),
    "gpu": (("gpu",), ("--universal", "--python-version", "3.11")),
}
# What installs the project itself (pip, and the build backend pyproject names): locked too, so an
# install on a fresh machine never builds with whatever setuptools was released last night.
BUILD_LOCK = "build"
DIGEST_LINE = "# pyproject-digest: "
# The CPU build of torch carries a local version (2.13.0+cpu); the lock names the public version so
# the same line is satisfied by PyTorch's CPU wheel and by PyPI's wheel when that index is out of
# reach (see tools/install-torch).
_LOCAL_TORCH = re.compile(r"^(torch==[0-9][^+\s]*)\+cpu\b", re.MULTILINE)
_PUBLIC_TORCH = re.compile(r"^(torch==[0-9][^+\s]*)$", re.MULTILINE)
# Where the resolver finds the CPU build of torch, so the CPU locks carry its dependencies (and not
# the CUDA build's several GB of nvidia-* wheels).
TORCH_CPU_LINKS = ("/opt/wheels", "https://download.pytorch.org/whl/cpu/torch/")


def pyproject_digest(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """A digest of everything in pyproject.toml that changes what a lock must hold."""
    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    relevant = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "build-system": data.get("build-system", {}).get("requires", []),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def build_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """pip itself and the build backend pyproject.toml names."""
    data = tomllib.loads(pyproject.read_text())
    return ["pip", *data["build-system"]["requires"]]


def _uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        raise SystemExit("uv is not installed: run `make lock`, which installs the dev extra")
    return found


def _compile(args: list[str], output: Path) -> None:
    cmd = [_uv(), "pip", "compile", "--quiet", "--no-header", "--output-file", str(output), *args]
    subprocess.run(cmd, check=True, cwd=ROOT)


def _torch_links() -> list[str]:
    local = Path(TORCH_CPU_LINKS[0])
    return ["--find-links", str(local) if local.is_dir() else TORCH_CPU_LINKS[1]]


def write_lock(name: str, digest: str, *, upgrade: bool) -> Path:
    """Resolve one lock with uv (keeping its current pins unless upgrading) and write it."""
    final = LOCK_DIR / f"{name}.txt"
    work = LOCK_DIR / f".{name}.txt.tmp"
    extras, python = LOCKS.get(name, ((), ("--python-version", "3.11")))
    cpu = "cpu" in extras
    if final.is_file() and not upgrade:
        # uv keeps the pins it finds in its output file; the CPU locks name torch's public version,
        # which would make uv prefer PyPI's CUDA build, so the seed names the CPU build again.
        seed = final.read_text()
        work.write_text(_PUBLIC_TORCH.sub(r"\1+cpu", seed) if cpu else seed)
    if name == BUILD_LOCK:
        source = LOCK_DIR / "build.in"
        source.write_text("\n".join(build_requirements()) + "\n")
        try:
            _compile([str(source), *python], work)
        finally:
            source.unlink()
    else:
        flags = [f for extra in extras for f in ("--extra", extra)]
        _compile(["pyproject.toml", *flags, *python, *(_torch_links() if cpu else [])], work)
    body = _LOCAL_TORCH.sub(r"\1", work.read_text())
    work.unlink()
    what = ", ".join(extras) if extras else "pip and the build backend"
    header = (
        f"# Locked dependencies ({what}); do not edit. Regenerate with `make lock`.\n"
        f"{DIGEST_LINE}{digest}\n"
    )
    final.write_text(header + body)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--upgrade", action="store_true", help="take the newest versions pyproject allows"
    )
    args = parser.parse_args(argv)
    if not args.upgrade:
        print("keeping current pins where pyproject still allows them (--upgrade: newest)")
    LOCK_DIR.mkdir(exist_ok=True)
    digest = pyproject_digest()
    for name in (BUILD_LOCK, *LOCKS):
        print(f"wrote {write_lock(name, digest, upgrade=args.upgrade).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
