"""Memory checks before loading a model, so a too-large model fails with a clear message."""

from __future__ import annotations

from pathlib import Path


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def available_ram_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def require_room(needed: int, available: int | None, where: str, directory: Path) -> None:
    from services.common.errors import ConfigError

    if available is not None and needed > available:
        raise ConfigError(
            f"config error in field 'model_dir': {directory} needs about {needed / 2**30:.1f} GiB "
            f"but only {available / 2**30:.1f} GiB of {where} is free"
        )
